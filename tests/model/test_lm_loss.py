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
