"""The Mamba-2 split + causal conv1d + SiLU kernels (transxssm_kernels/causal_conv.py) against the eager reference
(model/fused_ops.py: split_projection.reference), forward and backward, on random inputs: a length that is not a
multiple of a program's positions and more channels than one channel block (masked edges), groups with and without
z, the incoming gradients of x, B and C as separate tensors or some missing. fp32 in the Triton interpreter on CPU:
relative 1e-5 (the same fp32 math summed in another order); tests/gpu/test_fused_gpu.py checks bf16 on CUDA."""

import os

import pytest
import torch

from transxssm_megatron.model.fused_ops import split_projection

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_fused_gpu.py")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("widths, used", [((16, 24, 20, 20), "zxBC"), ((0, 24, 20, 20), "xBC"),
                                          ((16, 24, 20, 20), "xB")], ids=["z-gate", "no-z", "some-unused"])
def test_conv_split_kernels_match_reference(widths, used):
    from transxssm_kernels.causal_conv import BLOCK_C, DEFAULT_BACKWARD, conv_split

    g = torch.Generator().manual_seed(0)
    l, b, groups = DEFAULT_BACKWARD.positions * DEFAULT_BACKWARD.tiles + 44, 2, 3
    channels = groups * (widths[1] + 2 * widths[2])
    assert channels > BLOCK_C
    proj = torch.randn(l, b, groups * sum(widths), generator=g)
    weight = torch.randn(channels, 1, 4, generator=g) * 0.5
    bias = torch.randn(channels, generator=g) * 0.1
    results = {}
    for name, fn in (("kernels", conv_split), ("reference", split_projection.reference)):
        leaves = [t.clone().requires_grad_(True) for t in (proj, weight, bias)]
        outs = dict(zip("zxBC", fn(leaves[0], groups, widths, leaves[1], leaves[2])))
        cot = torch.Generator().manual_seed(1)
        loss = sum((outs[k] * torch.randn(outs[k].shape, generator=cot)).sum() for k in used)
        loss.backward()
        results[name] = [outs[k].detach() for k in "xBC"] + [t.grad for t in leaves]
        assert (outs["z"] is None) == (widths[0] == 0)
    for i, (got, want) in enumerate(zip(results["kernels"], results["reference"])):
        assert got.shape == want.shape and want.abs().sum() > 0, i
        assert rel(got, want) < 1e-5, (i, rel(got, want))


def test_conv_split_refuses_other_widths():
    from transxssm_kernels.causal_conv import conv_split

    with pytest.raises(ValueError, match="conv width of 4, got 3"):
        conv_split(torch.zeros(5, 1, 2 * 30), 2, (0, 10, 10, 10), torch.zeros(60, 1, 3), torch.zeros(60))
    with pytest.raises(ValueError, match="do not match the 60 conv channels"):
        conv_split(torch.zeros(5, 1, 2 * 30), 2, (0, 10, 10, 10), torch.zeros(30, 1, 4), torch.zeros(30))


def test_conv_kernels_compile_for_sm90_without_spills():
    """The GPU-only compile path at the launch's tiles and warps, here without a GPU."""
    from sm90_report import sm90_reports
    from transxssm_kernels import causal_conv as cc

    launch = cc.DEFAULT_BACKWARD
    kernels = [["conv_fwd_kernel", {"BT": cc.BLOCK_T, "BC": cc.BLOCK_C}, 4],
               ["conv_bwd_kernel", {"BT": launch.positions, "BC": launch.channels, "tiles": launch.tiles},
                launch.warps]]
    for report in sm90_reports("transxssm_kernels.causal_conv", kernels, ["dw_part_ptr", "db_part_ptr"]):
        assert 0 < report["registers"] <= 255 and report["spill_store_bytes"] == 0, report
