"""The embedding lookup that adds its weight gradient into main_grad (model/embedding.py), on CPU: the lookup
equals F.embedding, two micro-batches' gradients summed into main_grad equal the float64 dense gradient (repeated
ids included; fp32, relative 1e-6), and what backward hands autograd for the weight. The whole model's main_grad
after a training step, against megatron's lookup and hook, is tests/training/test_wgrad_accumulation.py's."""

import pytest
import torch
import torch.nn.functional as F

from transxssm_megatron.model.embedding import embed_into_main_grad


@pytest.mark.parametrize("give_grad", [True, False])
def test_gradient_goes_into_main_grad(give_grad):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(50, 16))
    weight.main_grad = torch.randn(50, 16)
    expected = weight.main_grad.double().clone()
    for _ in range(2):
        ids = torch.randint(0, 12, (7, 3))                      # few distinct ids: many repeats
        out = embed_into_main_grad(ids, weight, weight.main_grad, give_grad)
        assert torch.equal(out, F.embedding(ids, weight))
        g = torch.randn(out.shape)
        out.backward(g)
        expected.index_add_(0, ids.reshape(-1), g.reshape(-1, 16).double())
    err = ((weight.main_grad.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-6, err
    if give_grad:   # megatron's contract: a stand-in gradient, marked as already added
        assert weight.grad is not None and weight.grad.shape == weight.shape and weight.grad_added_to_main_grad
    else:
        assert weight.grad is None and not hasattr(weight, "grad_added_to_main_grad")


def test_main_grad_of_another_shape_is_refused():
    weight = torch.nn.Parameter(torch.randn(50, 16))
    with pytest.raises(ValueError, match=r"main_grad must have the embedding's shape \(50, 16\)"):
        embed_into_main_grad(torch.zeros(2, 2, dtype=torch.long), weight, torch.zeros(16, 50))
