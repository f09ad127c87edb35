"""Causal attention alone on one GPU, forward + backward, through each of PyTorch's SDPA backends (cuDNN, flash,
memory-efficient) and through SDPA's own choice, at the SA layers' shapes (64-wide heads; 32 of them at 1.3b, 12 at
320m) and the training rows' sequence lengths.

    python bench/attention_backends.py --out DIR [--shapes 1.3b:2x4096,1.3b:1x16384,...]

A shape is SIZE:BxL. Each backend is first checked against SDPA's math backend in fp32 on a small input (largest
relative error over the output and the gradients of q, k and v), then timed (median of triton.testing.do_bench over
forward + backward; TFLOP/s counts 3.5 x the causal forward's 2 b h l^2 D). Writes DIR/attention-backends.json and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_record import environment  # noqa: E402

HEADS = {"320m": 12, "1.3b": 32}
HEAD_DIM = 64
BACKENDS = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "default": None}


def attend(q, k, v, grad, backend) -> list[torch.Tensor]:
    """Forward + backward through one backend (None: SDPA's own choice); the output and the input gradients."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    else:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def inputs(b: int, h: int, l: int, dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, l, HEAD_DIM, device="cuda", generator=g).to(dtype) for _ in range(4)]


def checked(backend) -> float:
    """Largest relative error of one backend in bf16 against the math backend in fp32 (2 x 4 heads x 2,048)."""
    q, k, v, grad = inputs(2, 4, 2048, torch.float32, seed=1)
    want = attend(q, k, v, grad, [SDPBackend.MATH])
    got = attend(*(t.bfloat16() for t in (q, k, v, grad)), backend)
    return max(((a.float() - w).norm() / w.norm()).item() for a, w in zip(got, want))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="1.3b:2x4096,1.3b:1x16384,1.3b:1x32768,320m:4x4096,320m:1x16384,"
                        "320m:1x32768")
    args = parser.parse_args()
    shapes = []
    for item in args.shapes.split(","):
        size, _, bl = item.partition(":")
        b, _, l = bl.partition("x")
        if size not in HEADS or not (b.isdigit() and l.isdigit()):
            parser.error(f"--shapes {item!r}: want SIZE:BxL with SIZE one of {', '.join(HEADS)}, e.g. 1.3b:2x4096")
        shapes.append((size, int(b), int(l)))

    result = {"benchmark": "attention-backends", **environment("triton"), "head_dim": HEAD_DIM,
              "max_rel_err": {name: checked(backend) for name, backend in BACKENDS.items()}, "shapes": []}
    for size, b, l in shapes:
        q, k, v, grad = inputs(b, HEADS[size], l, torch.bfloat16)
        flops = 3.5 * 2 * b * HEADS[size] * l * l * HEAD_DIM
        row = {"size": size, "batch": b, "seq_length": l, "heads": HEADS[size], "ms_fwd_bwd": {}, "tflops": {}}
        for name, backend in BACKENDS.items():
            try:
                ms = do_bench(lambda: attend(q, k, v, grad, backend), rep=200)
            except RuntimeError as error:   # a backend that does not take this shape
                row["ms_fwd_bwd"][name] = None
                row.setdefault("errors", {})[name] = str(error).splitlines()[0]
                continue
            row["ms_fwd_bwd"][name] = round(ms, 3)
            row["tflops"][name] = round(flops / (ms * 1e-3) / 1e12, 1)
        result["shapes"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention-backends.json").write_text(json.dumps(result, indent=1))
    print("largest relative error against fp32 math: " +
          ", ".join(f"{n} {e:.1e}" for n, e in result["max_rel_err"].items()))
    print(f"{'shape':<18}" + "".join(f"{n:>16}" for n in BACKENDS) + "   (ms fwd+bwd, TFLOP/s)")
    for row in result["shapes"]:
        cells = [f"{row['ms_fwd_bwd'][n]:8.2f} {row['tflops'][n]:6.0f}" if row["ms_fwd_bwd"][n] else f"{'-':>15}"
                 for n in BACKENDS]
        print(f"{row['size']}:{row['batch']}x{row['seq_length']:<10}" + "".join(f"{c:>16}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
