"""The SwiGLU Triton kernels (transxssm_kernels/swiglu.py) against the eager reference, forward and backward, on
random inputs whose sizes are not multiples of the tiles (masked edges). fp32 in the Triton interpreter on CPU:
relative 1e-5 (the same fp32 math, another sigmoid); tests/gpu/test_fused_gpu.py checks bf16 on CUDA."""

import os

import pytest
import torch

from transxssm_megatron.model.fused_ops import swiglu

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_fused_gpu.py")


@pytest.mark.parametrize("shape", [(37, 2, 2 * 300), (5, 2 * 64)])
def test_swiglu_kernels_match_reference(shape):
    from transxssm_kernels.swiglu import swiglu as kernels

    torch.manual_seed(0)
    h = torch.randn(shape, dtype=torch.float32) * 2
    dout = torch.randn(*shape[:-1], shape[-1] // 2)
    outs = {}
    for name, fn in (("kernels", kernels), ("reference", swiglu.reference)):
        x = h.clone().requires_grad_(True)
        y = fn(x)
        y.backward(dout)
        outs[name] = (y.detach(), x.grad)
    for got, want in zip(outs["kernels"], outs["reference"]):
        assert got.shape == want.shape
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, err


def test_swiglu_odd_width_is_refused():
    from transxssm_kernels.swiglu import swiglu as kernels

    with pytest.raises(ValueError, match="must be even"):
        kernels(torch.zeros(3, 5))
