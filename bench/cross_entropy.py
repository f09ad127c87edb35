"""The LM head's cross-entropy alone on one GPU: one chunk of bf16 logits (4,096 tokens x the padded vocabulary)
through `transxssm_kernels.cross_entropy.cross_entropy_rows` (log-sum-exp, target logit and gradient in one
kernel) for several launch shapes, against the compiled pieces `model/lm_loss.py` runs where the kernel is not
used (vocab-parallel): `logsumexp_and_target` then `cross_entropy_grad`, torch.compile'd.

    python bench/cross_entropy.py --out DIR [--rows 4096] [--vocab 50304] [--variants 4096x8,2048x4,...]

A variant is BLOCKxWARPS: columns per load, warps per program (one program per row). Every result is checked
against float64 (log-sum-exp and target logit relative, gradient relative in bf16); times are medians of
triton.testing.do_bench. Writes DIR/cross-entropy.json and prints a table with each variant's memory traffic per
second (the logits read once, the gradient written once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_record import environment  # noqa: E402


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--variants", default="4096x8,4096x4,2048x4,8192x8")
    args = parser.parse_args()
    from transxssm_kernels.cross_entropy import cross_entropy_rows
    from transxssm_megatron.model.lm_loss import cross_entropy_grad, logsumexp_and_target

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, args.vocab, (args.rows,), device="cuda", generator=g)
    valid = torch.rand(args.rows, device="cuda", generator=g) > 0.05
    mask = valid.float()
    want_lse, want_picked = logsumexp_and_target.reference(logits.double(), target, valid)
    want_grad = cross_entropy_grad.reference(logits.double(), want_lse, target, valid, mask.double())

    def check(lse, picked, grad) -> dict:
        return {"lse_rel": relative(lse, want_lse), "picked_rel": relative(picked, want_picked),
                "grad_rel": relative(grad, want_grad)}

    def compiled():
        lse, picked = logsumexp_and_target(logits, target, valid)
        return lse, picked, cross_entropy_grad(logits, lse, target, valid, mask)

    def record(ms: float, outputs) -> dict:
        return {"ms": round(ms, 4), "tb_per_s": round(2 * logits.numel() * 2 / (ms * 1e-3) / 1e12, 2),
                **check(*outputs)}

    result = {"benchmark": "cross-entropy", **environment("triton"),
              "rows": args.rows, "vocab": args.vocab,
              "compiled_pieces": record(do_bench(compiled, rep=200), compiled()), "kernel": {}}
    for variant in args.variants.split(","):
        block, warps = map(int, variant.split("x"))
        run = lambda: cross_entropy_rows(logits, target, valid, mask, block=block, warps=warps)  # noqa: E731
        result["kernel"][variant] = record(do_bench(run, rep=200), run())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross-entropy.json").write_text(json.dumps(result, indent=1))
    print(f"{args.rows} x {args.vocab} bf16 logits: ms, TB/s, relative error of the gradient")
    for name, v in [("compiled", result["compiled_pieces"])] + list(result["kernel"].items()):
        print(f"  {name:<12}{v['ms']:8.3f}{v['tb_per_s']:7.2f}  {v['grad_rel']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
