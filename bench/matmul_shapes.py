"""cuBLAS alone on the linear layers of one micro-batch: the ceiling for the matmul share of a training step.

    python bench/matmul_shapes.py --out OUT [--preset 1.3b] [--tokens 8192]

For every linear layer of the model (SS in_proj and dt_proj, out_proj, attention QKV and output, SwiGLU fc1 and
fc2, the LM head; and in_proj with dt_proj's rows inside it, not counted in the sums) it times, on random bf16
operands, the forward matmul, the input gradient and the weight gradient added into an fp32 buffer (the training
default, `training/wgrad_accumulation.py`) or formed in bf16, and sums them over the model's layers. Compare the
sum with the matmul time of a profiled step (`bench/train_speed.py --profile`). Each product is timed as replays
of a CUDA graph of 20 launches, as training replays its step: the host's launch time, which exceeds the narrow
products' (dt_proj's ~10 us), is not counted. Writes OUT/matmul-shapes.json and
prints one line per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_record import environment  # noqa: E402

from transxssm_megatron.config import PRESETS, ModelConfig  # noqa: E402
from transxssm_megatron.training.wgrad_accumulation import accumulate_fp32  # noqa: E402


def layers(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, in features, out features, count) of every linear layer in a TransXSSM model, and with count 0 (timed,
    not summed) in_proj with dt_proj's rows inside it: what one projection would cost in place of the two."""
    kinds = cfg.layer_kinds()
    ss, sa = kinds.count("ss"), kinds.count("sa")
    d, P = cfg.hidden_size, cfg.head_dim
    groups = cfg.ss_groups or cfg.num_attention_heads
    in_proj = cfg.num_attention_heads * P + 2 * groups * cfg.state_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * P
    merged = -(-(in_proj + cfg.num_attention_heads) // 64) * 64     # dt's rows inside in_proj, padded to 64
    return [("ss in_proj", d, in_proj, ss), ("ss dt_proj", d, cfg.num_attention_heads, ss),
            ("ss in_proj+dt", d, merged, 0), ("ss out_proj", d, d, ss),
            ("sa qkv", d, qkv, sa), ("sa out", d, d, sa), ("ffn fc1", d, 2 * cfg.ffn_hidden_size, len(kinds)),
            ("ffn fc2", cfg.ffn_hidden_size, d, len(kinds)), ("lm head", d, cfg.padded_vocab_size, 1)]


def gpu_ms(fn, reps: int = 20) -> float:
    """GPU time per call of `fn`, replayed from a CUDA graph of `reps` calls (as training replays its step): the
    host's launch time, which exceeds a 10 us kernel's, is not counted."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="1.3b", choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (1.3b: 2 x 4096)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/matmul_shapes.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = ModelConfig.from_preset(args.preset)
    rows, totals = [], {"forward": 0.0, "input_grad": 0.0, "weight_grad_fp32": 0.0, "weight_grad_bf16": 0.0}
    for name, fan_in, fan_out, count in layers(cfg):
        x = torch.randn(args.tokens, fan_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(args.tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(fan_out, fan_in, device="cuda", dtype=torch.float32)
        ms = {"forward": gpu_ms(lambda: x @ w.t()), "input_grad": gpu_ms(lambda: dy @ w),
              "weight_grad_fp32": gpu_ms(lambda: accumulate_fp32(x, dy, main_grad)),
              "weight_grad_bf16": gpu_ms(lambda: dy.t() @ x)}
        flop = 2 * args.tokens * fan_in * fan_out
        row = {"layer": name, "in": fan_in, "out": fan_out, "count": count,
               "ms": {k: round(v, 4) for k, v in ms.items()},
               "tflops": {k: round(flop / v / 1e9, 1) for k, v in ms.items()}}
        rows.append(row)
        print(f"{name:12s} {fan_in:6d} -> {fan_out:6d} x{count:<3d} " +
              "  ".join(f"{k} {v:.3f} ms ({row['tflops'][k]:.0f} TFLOP/s)" for k, v in ms.items()), flush=True)
        for k in totals:
            totals[k] += count * ms[k]
    step = totals["forward"] + totals["input_grad"] + totals["weight_grad_fp32"]
    print(f"per micro-batch of {args.tokens} tokens: {step:.2f} ms (forward {totals['forward']:.2f}, input gradients "
          f"{totals['input_grad']:.2f}, weight gradients into fp32 {totals['weight_grad_fp32']:.2f})")
    record = {"benchmark": "matmul-shapes", **environment("triton", "megatron.core"), "preset": args.preset,
              "tokens": args.tokens, "layers": rows, "total_ms": {k: round(v, 2) for k, v in totals.items()},
              "step_ms": round(step, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matmul-shapes.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
