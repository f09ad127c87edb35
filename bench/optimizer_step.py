"""The optimizer step of a model's parameters on one GPU: torch's fused AdamW followed by megatron's copy of the
fp32 main parameters into the bf16 model parameters (one copy per tensor), against transxssm_kernels.adamw (one
launch that also writes the bf16 parameters), for several launch shapes of the latter.

    python bench/optimizer_step.py --out DIR [--preset 1.3b] [--variants 4096x8,8192x8,2048x4]

The tensors have the shapes of the preset's parameters (embedding, in_proj / dt_proj / out_proj and the per-head
parameters of the SS layers, the attention layers' projections, the MLPs, the norms), fp32 with random values,
fp32 gradients, moments from a first step. Each variant is timed as the median of 20 steps (CUDA events), after
its results were checked against torch's on one step (relative 1e-6 on parameters and moments, bf16 copies
equal). Writes DIR/optimizer-step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_record import environment  # noqa: E402
from transxssm_megatron.config import ModelConfig  # noqa: E402

HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def parameter_shapes(preset: str) -> list[tuple[int, ...]]:
    """The shapes of a TransXSSM preset's parameters (without the optional conv1d, D, dt_bias and z-gate)."""
    m = ModelConfig.from_preset(preset)
    d, H, P, N, G = m.hidden_size, m.num_attention_heads, m.head_dim, m.state_size, m.ss_groups
    shapes = [(m.padded_vocab_size, d), (d,)]                           # embedding (tied), final norm
    for kind in m.layer_kinds():
        if kind == "sa":
            shapes += [(3 * H * P, d), (d, H * P), (d,), (d,)]           # qkv, out, norm, skip weight
        else:
            shapes += [(G * (H // G * P + 2 * N), d), (H, d), (d, H * P), (H,), (d,), (d,)]  # ..., A_log
        shapes += [(2 * m.ffn_hidden_size, d), (d, m.ffn_hidden_size), (d,), (d,)]
    return shapes


def timed(fn, steps: int = 20) -> float:
    times = []
    for _ in range(steps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--variants", default="4096x8,8192x8,2048x4,8192x16",
                        help="launch shapes of the kernel, BLOCKxWARPS, comma-separated")
    args = parser.parse_args()
    from transxssm_kernels.adamw import AdamWTable, adamw_step

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = parameter_shapes(args.preset)
    params = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    models = [p.to(torch.bfloat16) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, fused=True, **HYPER)
    opt.step()   # moments and step counts exist from here on

    def torch_step():
        opt.step()
        for model, p in zip(models, params):
            model.copy_(p)

    states = [opt.state[p] for p in params]
    clones = lambda: ([p.detach().clone() for p in params], [s["exp_avg"].clone() for s in states],
                      [s["exp_avg_sq"].clone() for s in states], [s["step"].clone() for s in states])
    result = {"benchmark": "optimizer-step", **environment("triton"), "preset": args.preset, "tensors": len(params),
              "parameters": n, "variants": {}}
    start = clones()
    torch_ms = timed(torch_step)
    result["variants"]["torch fused AdamW + per-tensor copy"] = {"ms": round(torch_ms, 3)}
    result["variants"]["torch fused AdamW alone"] = {"ms": round(timed(opt.step), 3)}
    for variant in args.variants.split(","):
        block, warps = map(int, variant.split("x"))
        p, m, v, t = clones()
        copies = [torch.empty_like(x) for x in models]
        table = AdamWTable(block)
        step = lambda: adamw_step(table, p, [x.grad for x in params], m, v, t, copies, lr=HYPER["lr"], beta1=0.9,
                                  beta2=0.95, eps=1e-8, weight_decay=0.1, warps=warps)
        # checked first: one step from the same state as one torch step
        for dst, src in zip(p + m + v + t, start[0] + start[1] + start[2] + start[3]):
            dst.copy_(src)
        torch._foreach_add_(t, 1.0)
        step()
        for dst, src in zip(params + [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states] +
                            [s["step"] for s in states], start[0] + start[1] + start[2] + start[3]):
            dst.copy_(src)
        opt.step()
        errors = [((a - b).norm() / b.norm()).item() for a, b in
                  zip(p + m + v, params + [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states])]
        exact = all(torch.equal(c, x.to(torch.bfloat16)) for c, x in zip(copies, p))
        ms = timed(lambda: (torch._foreach_add_(t, 1.0), step()))
        result["variants"][f"kernel {variant}"] = {"ms": round(ms, 3), "max_rel_err": max(errors),
                                                    "copies_exact": exact,
                                                    "tb_per_s": round(30 * n / (ms * 1e-3) / 1e12, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer-step.json").write_text(json.dumps(result, indent=1))
    print(f"{args.preset}: {len(params)} tensors, {n / 1e9:.2f}B parameters")
    for name, v in result["variants"].items():
        print(f"  {name:<42}{v['ms']:8.2f} ms  {v.get('tb_per_s', '')} {v.get('max_rel_err', '')}"
              f" {v.get('copies_exact', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
