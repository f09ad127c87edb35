"""The skip-add + RMSNorm backward kernels (transxssm_kernels/residual_norm.py) against autograd through the eager
reference: d h, d u, the skip weight w and the norm weight v, on random inputs and weights, channel counts that
are not powers of two (masked edges), with and without w, with the gradient of h' absent, and with the weights'
gradients added into pre-filled `main_grad` buffers. fp32 in the Triton interpreter on CPU: relative 1e-5 (the same
fp32 math summed in another order); tests/gpu/test_fused_gpu.py checks bf16 on CUDA at the models' sizes."""

import os

import pytest
import torch

from transxssm_megatron.model.fused_ops import skip_add_norm

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_fused_gpu.py")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape, with_w, with_dout, into_main_grad", [
    ((37, 2, 300), True, True, False), ((9, 64), False, True, False), ((13, 3, 96), True, False, False),
    ((700, 40), True, True, True)],
    ids=["skip-weight", "plain-residual", "no-gradient-of-h'", "into-main-grad-many-programs"])
def test_backward_kernels_match_reference(shape, with_w, with_dout, into_main_grad):
    g = torch.Generator().manual_seed(0)
    C = shape[-1]
    inputs = [torch.randn(shape, generator=g) * 2, (1 + 0.3 * torch.randn(C, generator=g)) if with_w else None,
              torch.randn(shape, generator=g), 1 + 0.3 * torch.randn(C, generator=g)]
    dout, dnormed = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    prior = [torch.randn(C, generator=g) if t is not None else None for t in inputs[1::2]]
    results = {}
    for name in ("kernels", "reference"):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
        if name == "kernels":
            for weight, start in zip(leaves[1::2], prior):
                if weight is not None:
                    weight.main_grad = start.clone()
            out, normed = skip_add_norm.with_kernels(*leaves, 1e-5, into_main_grad)
        else:
            out, normed = skip_add_norm.reference(*leaves, 1e-5)
        torch.autograd.backward([out, normed] if with_dout else [normed], [dout, dnormed] if with_dout else [dnormed])
        grads = [t.grad for t in leaves if t is not None]
        if name == "kernels" and into_main_grad:
            assert all(t.grad_added_to_main_grad for t in leaves[1::2])
            grads[1::2] = [t.main_grad - start for t, start in zip(leaves[1::2], prior)]
        results[name] = [out.detach(), normed.detach()] + grads
    assert len(results["kernels"]) == (6 if with_w else 5)
    for i, (got, want) in enumerate(zip(results["kernels"], results["reference"])):
        assert got.shape == want.shape, i
        assert rel(got, want) < 1e-5, (i, rel(got, want))
