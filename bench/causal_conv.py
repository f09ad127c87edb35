"""The Mamba-2 mixer's projection split with its causal conv1d + SiLU alone on one GPU, forward and backward:
`transxssm_kernels.causal_conv.conv_split` (the model's default on CUDA) for several backward launch shapes
against Inductor's compiled split (`fused_ops.split_projection` with TRANSXSSM_CONV_KERNELS=0, set here).

    python bench/causal_conv.py --out DIR [--shape 4096,4,12] [--variants 16x64x8x16,16x64x8x1,...]

--shape is l, b, G at Mamba-2 320m's group widths (z 64 | x 64 | B 128 | C 128). A variant is
POSITIONSxCHANNELSxWARPSxTILES: the backward's tile, warps per program and tiles per program. Every path is
checked against the eager reference in fp32 (largest relative error over the outputs and the gradients of proj,
the weight and the bias); times are medians of triton.testing.do_bench over forward + backward. Writes
DIR/causal-conv.json and prints a table with each path's time and memory traffic per second (forward: x|B|C read
and the conv's output written; backward: the gradients and x|B|C read, proj's gradient written; each once).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_record import environment  # noqa: E402

WIDTHS = (64, 64, 128, 128)   # z, x, B, C channels per group (Mamba-2 320m: 12 groups of one 64-wide head)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="4096,4,12", help="l,b,G")
    parser.add_argument("--variants", default="16x64x8x16,16x64x8x4,16x64x8x1,16x64x4x16,16x64x4x1,32x64x8x4,"
                        "32x64x8x1,16x128x8x4,16x128x8x1,64x64x8x1")
    args = parser.parse_args()
    try:
        l, b, groups = map(int, args.shape.split(","))
    except ValueError:
        parser.error(f"--shape {args.shape!r}: want three integers l,b,G, e.g. 4096,4,12")
    launches = {v: tuple(int(n) for n in v.split("x") if n.isdigit()) for v in args.variants.split(",")}
    if any(len(launch) != 4 or len(v.split("x")) != 4 for v, launch in launches.items()):
        parser.error(f"--variants {args.variants!r}: each is POSITIONSxCHANNELSxWARPSxTILES, e.g. 16x64x8x16")
    import transxssm_kernels.causal_conv as kernels
    from transxssm_megatron.model.fused_ops import split_projection

    os.environ["TRANSXSSM_CONV_KERNELS"] = "0"   # split_projection through Inductor: the baseline

    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    channels = groups * sum(WIDTHS[1:])
    proj = rand(l, b, groups * sum(WIDTHS)).bfloat16()
    weight, bias = (rand(channels, 1, kernels.WIDTH) * 0.5).bfloat16(), (rand(channels) * 0.5).bfloat16()
    grads = [rand(l, b, groups, w).bfloat16() for w in WIDTHS]

    def step(split, dtype=torch.bfloat16) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (proj, weight, bias)]
        outs = split(leaves[0], groups, WIDTHS, *leaves[1:])
        torch.autograd.backward(list(outs), [d.to(dtype) for d in grads])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    want = step(split_projection.reference, torch.float32)

    def record(split) -> dict:
        error = max(((a.float() - w).norm() / w.norm()).item() for a, w in zip(step(split), want))
        ms = do_bench(lambda: step(split), rep=200)
        xbc = l * b * channels
        traffic = (3 * xbc + 2 * proj.numel()) * 2   # bytes, bf16: forward 2 x xbc, backward xbc + 2 x proj
        return {"ms_fwd_bwd": round(ms, 4), "tb_per_s": round(traffic / (ms * 1e-3) / 1e12, 2),
                "max_rel_err": error}

    result = {"benchmark": "causal-conv", **environment("triton"), "l": l, "b": b, "groups": groups,
              "widths": WIDTHS, "compiled": record(split_projection), "kernels": {}}
    for variant, shape in launches.items():
        launch = kernels.BackwardLaunch(*shape)
        result["kernels"][variant] = record(functools.partial(kernels.conv_split, backward_launch=launch))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "causal-conv.json").write_text(json.dumps(result, indent=1))
    print(f"l {l}, b {b}, {groups} groups: forward + backward ms, TB/s, largest relative error")
    for name, v in [("compiled", result["compiled"])] + list(result["kernels"].items()):
        print(f"  {name:<14}{v['ms_fwd_bwd']:8.3f}{v['tb_per_s']:7.2f}  {v['max_rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
