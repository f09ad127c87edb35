"""The chunked LM head + cross-entropy (model/lm_loss.py) against full logits and F.cross_entropy, and inside the
model against megatron's output layer + vocab-parallel cross-entropy at TP = 1, TP = 2 and TP = 2 with sequence
parallelism (2 gloo ranks). Random inputs, a loss mask with zeros, chunks that do not divide the token count."""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from model_parallel_utils import batch, full_grads, small_cfg, tp_model_with

from transxssm_megatron.model.lm_loss import linear_cross_entropy


def test_matches_full_logits_float64():
    """float64: loss and both gradients equal the unchunked computation to 1e-12 (relative)."""
    g = torch.Generator().manual_seed(0)
    T, d, V = 37, 16, 50
    hidden = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=g)
    mask = (torch.rand(T, generator=g) > 0.3).double()
    scale = torch.tensor(0.37, dtype=torch.float64)

    ours = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8)   # 4 full chunks + 5 tokens
    (ours * scale).backward()
    got = (ours.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref = (F.cross_entropy(hidden @ weight.t(), labels, reduction="none") * mask).sum()
    (ref * scale).backward()
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, (ref.detach(), hidden.grad, weight.grad)):
        assert b.abs().sum() > 0
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-12, f"{name}: relative error {err:.2e}"


def test_weight_gradient_buffer_is_written_whole_by_the_first_chunk(monkeypatch):
    """The fp32 weight-gradient buffer is allocated uninitialised (no zero fill); the first chunk overwrites it: with
    torch.empty handing out NaN-filled memory the gradients still equal the unchunked ones (float64, 1e-12)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels, mask = torch.randint(0, 30, (21,), generator=g), torch.ones(21, dtype=torch.float64)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8).backward()
    monkeypatch.undo()
    got = weight.grad.clone()
    weight.grad = None
    (F.cross_entropy(hidden @ weight.t(), labels, reduction="none") * mask).sum().backward()
    assert torch.isfinite(got).all()
    assert ((got - weight.grad).norm() / weight.grad.norm()).item() < 1e-12


@pytest.mark.parametrize("tied_on_this_stage", [True, False], ids=["tied", "own-weight"])
def test_main_grad_receives_the_weight_gradient(tied_on_this_stage):
    """With main_grad (megatron's fp32 buffer under gradient accumulation fusion) the weight gradient, scaled by the
    incoming gradient, is added to what the buffer held (two micro-batches, float64 inputs, relative 1e-12), and
    backward returns what megatron's linear layers return: nothing for a weight tied to the embedding on this stage
    (`zero_out_wgrad`), else a stand-in that megatron's hook is told not to add (`grad_added_to_main_grad`)."""
    g = torch.Generator().manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(30, 8, generator=g, dtype=torch.float64))
    if tied_on_this_stage:
        weight.zero_out_wgrad = True
    weight.grad_added_to_main_grad = False
    main_grad = torch.randn(30, 8, generator=g, dtype=torch.float64)
    expected = main_grad.clone()
    for scale in (0.37, 1.5):   # two micro-batches into the same buffer
        hidden = torch.randn(21, 8, generator=g, dtype=torch.float64)
        labels, mask = torch.randint(0, 30, (21,), generator=g), (torch.rand(21, generator=g) > 0.3).double()
        (linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8, main_grad=main_grad) * scale).backward()
        w = weight.detach().requires_grad_()
        ((F.cross_entropy(hidden @ w.t(), labels, reduction="none") * mask).sum() * scale).backward()
        expected += w.grad
        if tied_on_this_stage:
            assert weight.grad is None and not weight.grad_added_to_main_grad
        else:
            assert weight.grad is not None and weight.grad_added_to_main_grad
        weight.grad = None
    assert ((main_grad - expected).norm() / expected.norm()).item() < 1e-12


def test_rejects_a_main_grad_of_another_shape():
    with pytest.raises(ValueError, match="main_grad"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long), torch.ones(4),
                             main_grad=torch.zeros(8, 10))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels and loss_mask"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(5, dtype=torch.long), torch.ones(4))


def _masked_loss_run(sequence_parallel, full_weights, fused):
    """The model's masked loss sum (chunked path when `fused`, megatron's otherwise) and TP-gathered gradients."""
    from transxssm_megatron.model.fused_ops import set_fusion

    set_fusion(fused)
    model, full_weights = tp_model_with(small_cfg("transxssm"), full_weights, sequence_parallel)
    ids, labels = batch()
    mask = (torch.arange(labels[0].numel()).view_as(labels[0]) % 5 != 0).float()
    loss = model(ids[0], None, labels=labels[0], loss_mask=mask)
    loss.backward()
    return dict(loss=loss.detach(), grads=full_grads(model), weights=full_weights)


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-sequence-parallel"])
def test_model_loss_matches_megatron_path(tp, sequence_parallel):
    """Same weights: the chunked path's loss and every gradient equal megatron's output layer + cross-entropy (fp32,
    relative 1e-5), including over a vocabulary split between TP ranks."""
    ref = run_distributed(_masked_loss_run, 1, False, None, False)[0]
    ours = run_distributed(_masked_loss_run, tp, sequence_parallel, ref["weights"], True, tp=tp)[0]
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-5, atol=0)
    for name, grad in ref["grads"].items():
        err = ((ours["grads"][name] - grad).norm() / grad.norm().clamp(min=1e-30)).item()
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Validation runs under no_grad: the same loss, and the gradient of the logits is never formed."""
    import transxssm_megatron.model.lm_loss as lm_loss

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g, requires_grad=True)
    labels, mask = torch.randint(0, 30, (20,), generator=g), torch.ones(20)
    expected = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8).detach()
    monkeypatch.setattr(lm_loss, "cross_entropy_grad", lambda *a: pytest.fail("gradient formed under no_grad"))
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8), expected)
