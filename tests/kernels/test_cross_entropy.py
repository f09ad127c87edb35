"""The cross-entropy rows kernel (transxssm_kernels/cross_entropy.py) against the LM head's eager pieces
(model/lm_loss.py: logsumexp_and_target, cross_entropy_grad) on random logits, large and small, a vocabulary that
is not a multiple of the kernel's block (masked edge), targets outside this vocabulary (invalid rows) and a 0/1
mask. fp32 in the Triton interpreter on CPU: the log-sum-exp within relative 1e-6 (online, it sums in another
order), the gradient within 1e-5 (its exponentials are taken in base 2 of x * log2(e), a product rounded to fp32:
each exponent moves by up to |x| * 2^-24, ~1e-5 for the logits of up to ~160 here; a GPU's exp works the same way);
tests/gpu/test_fused_gpu.py checks bf16 on CUDA."""

import os

import pytest
import torch

from transxssm_megatron.model.lm_loss import cross_entropy_grad, logsumexp_and_target

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_fused_gpu.py")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_rows_kernel_matches_eager_pieces(scale):
    from transxssm_kernels.cross_entropy import BLOCK, cross_entropy_rows

    g = torch.Generator().manual_seed(0)
    rows, V = 6, BLOCK + 905
    logits = torch.randn(rows, V, generator=g) * scale
    target = torch.randint(-300, V, (rows,), generator=g)
    target[0], target[1] = -5, V - 1                     # one invalid row, one target in the masked last block
    valid = (target >= 0) & (target < V)
    mask = (torch.rand(rows, generator=g) > 0.3).float()
    lse, picked, grad = cross_entropy_rows(logits, target, valid, mask)
    want_lse, want_picked = logsumexp_and_target.reference(logits, target, valid)
    assert rel(lse, want_lse) < 1e-6 and torch.equal(picked, want_picked)
    assert picked[0] == 0 and valid[1]
    assert rel(grad, cross_entropy_grad.reference(logits, want_lse, target, valid, mask)) < 1e-5
    assert cross_entropy_rows(logits, target, valid)[2] is None


def test_rows_kernel_with_masked_out_columns():
    """-inf logits (a whole first block of them, then scattered): no NaN, those columns get probability 0."""
    from transxssm_kernels.cross_entropy import BLOCK, cross_entropy_rows

    g = torch.Generator().manual_seed(1)
    rows, V = 3, BLOCK + 300
    logits = torch.randn(rows, V, generator=g) * 4
    logits[0, :BLOCK] = float("-inf")
    logits[1, ::7] = float("-inf")
    target = torch.tensor([BLOCK + 3, 1, 5])
    valid, mask = torch.ones(rows, dtype=torch.bool), torch.ones(rows)
    lse, picked, grad = cross_entropy_rows(logits, target, valid, mask)
    want_lse, want_picked = logsumexp_and_target.reference(logits, target, valid)
    assert rel(lse, want_lse) < 1e-6 and torch.equal(picked, want_picked)
    assert not grad.isnan().any() and (grad[0, :BLOCK] == 0).all() and (grad[1, 7::7] == 0).all()
    assert rel(grad, cross_entropy_grad.reference(logits, want_lse, target, valid, mask)) < 1e-5


def test_rows_kernel_refuses_strided_logits():
    from transxssm_kernels.cross_entropy import cross_entropy_rows

    with pytest.raises(ValueError, match="contiguous last dim"):
        cross_entropy_rows(torch.zeros(8, 4).t(), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))
