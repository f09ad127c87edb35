"""Mamba-2's output gate kernels (transxssm_kernels/gate_norm.py) against the eager reference
(model/fused_ops.py: gate_norm.reference), forward and backward, on random inputs: strided views for y, x and z,
more rows than one program takes and a masked last block, groups of one head, two heads and a width that is not a
power of two, with D and without. fp32 in the Triton interpreter on CPU: relative 1e-5 (the same fp32 math summed in
another order); tests/gpu/test_fused_gpu.py checks bf16 on CUDA."""

import os

import pytest
import torch

from transxssm_megatron.model.fused_ops import gate_norm

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_fused_gpu.py")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("heads, head_dim, group_size, with_d", [(4, 16, 16, True), (4, 16, 32, True),
                                                                 (6, 8, 24, True), (4, 16, 32, False)],
                         ids=["group-of-one-head", "group-of-two-heads", "group-of-24", "no-D"])
def test_gate_norm_kernels_match_reference(heads, head_dim, group_size, with_d):
    from transxssm_kernels.gate_norm import BLOCK_ROWS, ROW_BLOCKS_PER_PROGRAM, gate_norm as kernels

    g = torch.Generator().manual_seed(0)
    l, b = (BLOCK_ROWS * ROW_BLOCKS_PER_PROGRAM) // 2 + 9, 2
    wide = torch.randn(l, b, heads, 3 * head_dim, generator=g)        # y, x, z as strided views of one tensor
    D = torch.randn(heads, generator=g) if with_d else None
    weight = torch.randn(heads * head_dim, generator=g) * 0.2 + 1
    dres = torch.randn(l, b, heads * head_dim, generator=g)
    results = {}
    for name, fn in (("kernels", kernels), ("reference", gate_norm.reference)):
        leaves = [t.clone().requires_grad_(True) for t in (wide, weight) + ((D,) if with_d else ())]
        y, x, z = leaves[0].split(head_dim, dim=-1)
        out = fn(y, x, leaves[2] if with_d else None, z, leaves[1], 1e-6, group_size)
        out.backward(dres)
        results[name] = [out.detach()] + [t.grad for t in leaves]
    for i, (got, want) in enumerate(zip(results["kernels"], results["reference"])):
        assert got.shape == want.shape and want.abs().sum() > 0, i
        assert rel(got, want) < 1e-5, (i, rel(got, want))


def test_gate_norm_refuses_groups_that_do_not_divide_the_channels():
    from transxssm_kernels.gate_norm import gate_norm as kernels

    with pytest.raises(ValueError, match="groups of 24 channels do not divide the 64 channels"):
        kernels(*[torch.zeros(3, 1, 4, 16)] * 2, None, torch.zeros(3, 1, 4, 16), torch.ones(64), 1e-6, 24)


def test_gate_norm_kernels_compile_for_sm90_without_spills():
    """The GPU-only compile path at the launch's tiles (groups of 64 channels), here without a GPU."""
    from sm90_report import sm90_reports
    from transxssm_kernels import gate_norm as gn

    tiles = {"BR": gn.BLOCK_ROWS, "BG": 64, "HAS_D": True}
    kernels = [["gate_norm_fwd_kernel", tiles, 4],
               ["gate_norm_bwd_kernel", {**tiles, "blocks": gn.ROW_BLOCKS_PER_PROGRAM}, 4]]
    for report in sm90_reports("transxssm_kernels.gate_norm", kernels, ["dw_part_ptr", "dd_part_ptr", "d_ptr"]):
        assert 0 < report["registers"] <= 255 and report["spill_store_bytes"] == 0, report
