"""Training speed per GPU: `transxssm train` beside a compiled plain-PyTorch baseline, and where the time goes.

    python bench/train_speed.py --out DIR [--rows 320m_4k,1.3b_4k] [--variants fused,graph,reference]
                                [--accumulation 1,8] [--anchor PATH] [--profile fused,reference]
                                [--override KEY=VALUE ...]

For every row (model, sequence length, micro-batch) it runs `transxssm train` on mock data in a fresh process, once
per variant and per number of micro-batches accumulated into each optimizer step (1: the baseline script's step;
8: closer to pretraining, where a step accumulates dozens of micro-batches per GPU and the optimizer is a small
share), variants being:
  fused      elementwise work compiled, chunked LM head + cross-entropy, fused AdamW, each kernel launched by
             the CPU (train.cuda_graph=false; the default on more than one GPU)
  graph      fused + train.cuda_graph=true (forward+backward replayed as one CUDA graph; the default on one GPU)
  recompute  fused + train.recompute=true (activations recomputed in backward: long contexts)
  overlap    fused + the gradient reduce-scatter and parameter all-gather overlapped with compute (--nproc > 1)
  reference  train.fused=false: the eager path the fused one is checked against
  graph-no-wgrad-fusion  graph, weight gradients formed in bf16 and added to the fp32 buffer by a separate kernel
  no-wgrad-fusion        fused, weight gradients formed in bf16 and added by a separate kernel
and, with --anchor, the baseline script (a ~150-line PyTorch model of the same architecture with torch.compile per
block and our SSD kernel) with the same shapes. tokens/s is the median over the logged intervals after the
first (which holds compilation and warm-up); each run does about --micro-batches micro-batches, and records the
GPU's SM clock and power while it lasts (nvidia-smi every 0.5 s, `gpu_clocks`: an H200 at its power cap runs below
its top clock, and ours and the baseline may not run at the same one). --profile adds,
per row and named variant (VARIANT/accN: N micro-batches per step, default 1), a torch.profiler breakdown of a
step's GPU time by kind of work (matmuls, SSD kernels, attention, compiled elementwise, eager elementwise,
optimizer, ...), and the GPU time and launches per step of its 80 largest kernels.
--override passes a config override to every run of ours (recorded in the JSON), e.g. model.ss_chunk_size=128.
--loss-curve DATA_DIR trains 320m fused and reference side by side on real preprocessed data (same seed, data order
and schedule) and compares the loss curves step by step; --curve-config trains another model (e.g. mamba2_320m,
whose conv1d and output gate have kernels of their own); --curve-variants trains others too (e.g.
fused,reference,no-wgrad-fusion), each compared with the first.

--gpus N spreads the rows over N GPUs of the machine (the table's rows take ~680 s one after another): each
row runs on one GPU, its runs of ours and then its baseline one after the other, so that every ratio compares two
runs of one GPU; a GPU takes the next row when it is free.
--nproc N trains each run of ours under torchrun on N GPUs (data-parallel, or the layout an --override sets:
parallel.tp=2, ...), each data-parallel rank accumulating the same micro-batches per step as one GPU would; its
tokens/s per GPU is compared with the one-GPU baseline. Variant `overlap` overlaps the gradient reduce-scatter and
the parameter all-gather with compute (docs/training.md). A row then takes N of the --gpus.

Writes OUT/train-speed.json: `rows` (one object per row: model, seq_length, micro_batch_size, ours_tokens_per_s,
anchor_tokens_per_s, ours_mfu, mem_gib, and per-variant details; with --nproc, `processes` and tokens/s per GPU),
the date, commit, GPU, the UUIDs of the GPUs seen (`gpu_uuids`: two calls that name the same ran on the same
GPUs), versions, the TRANSXSSM_* environment variables and CUBLAS_WORKSPACE_CONFIG where set, and every command
(with --gpus, `gpu_index` per row); each row's processes log to OUT/train-speed-ROW.log. Prints a short table
at the end (the ratio per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from run_record import GpuClocks, GpuSlot, environment, on_gpus  # noqa: E402
from transxssm_megatron.training.metrics import read_metrics  # noqa: E402
from transxssm_megatron.training.run_config import RunConfig  # noqa: E402

# name: (config, anchor architecture or None, size, seq_length, micro_batch_size)
ROWS = {
    "320m_4k": ("320m", "hybrid", "320m", 4096, 4),
    "transformer_320m_4k": ("transformer_320m", "llama", "320m", 4096, 4),
    "1.3b_4k": ("1.3b", "hybrid", "1.3b", 4096, 2),
    "mamba2_320m_4k": ("mamba2_320m", None, "320m", 4096, 4),
    "jamba_320m_4k": ("jamba_320m", None, "320m", 4096, 4),
    "320m_16k": ("320m", "hybrid", "320m", 16384, 1),
    "transformer_320m_16k": ("transformer_320m", "llama", "320m", 16384, 1),
    "320m_32k": ("320m", "hybrid", "320m", 32768, 1),
    "transformer_320m_32k": ("transformer_320m", "llama", "320m", 32768, 1),
    "1.3b_16k": ("1.3b", "hybrid", "1.3b", 16384, 1),
    "1.3b_32k": ("1.3b", "hybrid", "1.3b", 32768, 1),
}
VARIANTS = {"fused": ["train.cuda_graph=false"], "graph": ["train.cuda_graph=true"],
            "recompute": ["train.recompute=true"],
            "overlap": ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
            "reference": ["train.fused=false"],
            "graph-no-wgrad-fusion": ["train.cuda_graph=true", "train.wgrad_fusion=false"],
            "no-wgrad-fusion": ["train.cuda_graph=false", "train.wgrad_fusion=false"]}

# Kernel name fragments -> kind of work, first match wins (names from PyTorch 2.11 / Triton 3.6 on an H200).
KINDS = [
    ("SSD (our Triton kernels)", ("state_scan_", "chunk_output", "dc_kernel", "dxdb_kernel", "delta_kernel",
                                  "dt_grad_kernel", "head_grads_kernel", "chunk_sums_kernel",
                                  "states_from_sums_kernel")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "cublas")),
    ("compiled elementwise (Inductor; SwiGLU's Triton kernels)", ("triton_", "swiglu_")),
    ("optimizer (AdamW, norms)", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("communication", ("nccl",)),
    ("copies, casts, concat", ("copy", "cat_", "CatArray", "transpose")),
    ("other eager elementwise / reductions", ("",)),
]


def run_config_overrides(row: str, steps: int, interval: int, accumulation: int, run_dir: Path,
                         layout: tuple[str, ...] = (), processes: int = 1) -> tuple[str, list[str]]:
    """The row's config file and overrides: `accumulation` micro-batches per step on each data-parallel rank of
    `processes` ranks laid out by the `layout` overrides (parallel.tp=2, ...)."""
    config, _, _, seq, mbs = ROWS[row]
    dp = RunConfig.load(REPO / "configs" / f"{config}.yaml", list(layout)).data_parallel_size(processes)
    return f"configs/{config}.yaml", [
        "data.mode=mock", f"train.seq_length={seq}", f"model.max_seq_length={seq}", f"train.micro_batch_size={mbs}",
        f"train.global_batch_size={mbs * accumulation * dp}", f"train.steps={steps}", "train.eval_interval=0",
        "train.eval_iters=0", f"logging.interval={interval}", "logging.tensorboard=false", "checkpoint.interval=0",
        "checkpoint.save_at_end=false", "checkpoint.resume=none", f"logging.run_dir={run_dir}"]


def run(cmd: list[str], log, timeout_s: float, slot: GpuSlot) -> tuple[int | str, float]:
    log.write(f"\n===== {' '.join(cmd)}\n")
    log.flush()
    started = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                            env=slot.env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return rc, time.monotonic() - started


def ours(row: str, variant: str, accumulation: int, args, log, slot: GpuSlot) -> dict:
    run_dir = Path(args.work) / f"{row}-{variant}-acc{accumulation}"
    steps = max(7, args.micro_batches // accumulation)
    chosen = (*VARIANTS[variant], *args.override)
    config, overrides = run_config_overrides(row, steps, max(1, steps // 6), accumulation, run_dir, chosen,
                                             args.nproc)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"] \
        if args.nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "transxssm_megatron.cli", "train", "--config", config, *overrides,
           *chosen]
    with GpuClocks(Path(args.work) / f"{row}-{variant}-acc{accumulation}-clocks.csv", slot.smi_index) as clocks:
        rc, wall = run(cmd, log, args.timeout, slot)
    records, _ = read_metrics(run_dir / "metrics.jsonl")
    steady = [r for r in records if "tokens_per_s" in r][1:]
    med = lambda k: statistics.median(r[k] for r in steady) if steady and k in steady[0] else None
    tokens_per_s = med("tokens_per_s")
    return {"command": " ".join(cmd), "exit_code": rc, "wall_s": round(wall, 1), "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / args.nproc if tokens_per_s else None, "mfu": med("mfu"),
            "tflops_per_gpu": med("tflops_per_device"), "step_time_s": med("step_time_s"),
            "mem_gib": max((r.get("mem_peak_gib", 0) for r in records), default=None),
            "losses": [round(r["loss"], 4) for r in records if "loss" in r], "gpu_clocks": clocks.summary()}


def anchor(row: str, args, log, slot: GpuSlot) -> dict | None:
    _, arch, size, seq, mbs = ROWS[row]
    if arch is None or not args.anchor:
        return None
    cmd = [sys.executable, args.anchor, arch, size, str(seq), str(mbs), str(args.anchor_steps)]
    out_file = Path(args.work) / f"{row}-anchor.txt"
    log.write(f"\n===== {' '.join(cmd)}\n")
    log.flush()
    started = time.monotonic()
    try:
        with GpuClocks(Path(args.work) / f"{row}-anchor-clocks.csv", slot.smi_index) as clocks:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=slot.env)
        rc, text = proc.returncode, proc.stdout
        log.write(proc.stdout + proc.stderr[-3000:])
    except subprocess.TimeoutExpired:
        rc, text = "timeout", ""
    out_file.write_text(text)
    result = next((json.loads(x) for x in text.splitlines() if x.startswith("{")), {})
    return {"command": " ".join(cmd), "exit_code": rc, "wall_s": round(time.monotonic() - started, 1), **result,
            "gpu_clocks": clocks.summary()}


def profile(row: str, variant: str, args) -> dict:
    """In this process: a few steps of the Trainer, then one profiled step's kernels by kind."""
    import torch
    from torch.autograd import DeviceType

    from transxssm_megatron.training import data as data_lib
    from transxssm_megatron.training.loop import Trainer
    from transxssm_megatron.training.run_config import RunConfig

    name, _, acc = variant.partition("/acc")
    config, overrides = run_config_overrides(row, 100, 100, int(acc or 1),
                                             Path(args.work) / f"{row}-{name}-acc{acc or 1}-profile")
    trainer = Trainer(RunConfig.load(str(REPO / config), overrides + VARIANTS[name] + args.override))
    try:
        batches = trainer._data_iterators(lambda: data_lib.train_batches(trainer.datasets.train, 0, trainer.cfg,
                                                                         trainer.world))
        for _ in range(4):
            trainer.train_step(batches, wait=False)   # as the training loop runs: the host a step ahead
        trainer.settle()
        torch.cuda.synchronize()
        steps = 3
        started = time.perf_counter()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        if name != "graph":   # eager: also the host ops, to tell which op launches each kernel
            activities.append(torch.profiler.ProfilerActivity.CPU)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step(batches, wait=False)
            trainer.settle()
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / steps
    finally:
        trainer.close()
    kinds = {name: {"ms": 0.0, "kernels": 0} for name, _ in KINDS}
    top: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        kind = next(name for name, keys in KINDS if any(k in event.name.lower() or k in event.name for k in keys))
        kinds[kind]["ms"] += us / 1e3 / steps
        kinds[kind]["kernels"] += 1 / steps
        top[event.name[:90]] = top.get(event.name[:90], 0.0) + us / 1e3 / steps
        calls[event.name[:90]] = calls.get(event.name[:90], 0) + 1
    gpu_ms = sum(k["ms"] for k in kinds.values())
    largest = sorted(top, key=lambda k: -top[k])[:80]
    idle = idle_between_kernels(prof, steps)
    return {"row": row, "variant": variant, "micro_batches_per_step": int(acc or 1),
            "wall_ms_per_step": round(wall_ms, 2), "gpu_ms_per_step": round(gpu_ms, 2),
            "kinds": {n: {"ms": round(k["ms"], 2), "share": round(k["ms"] / gpu_ms, 3), "kernels": round(k["kernels"])}
                      for n, k in kinds.items()},
            "top_kernels_ms": {k: round(top[k], 3) for k in largest},
            # launches per step of each of those kernels: top_kernels_ms / calls is the time of one launch in the step
            "top_kernels_calls": {k: calls[k] // steps for k in largest}, "idle": idle,
            "launched_by": launching_ops(prof, steps) if name != "graph" else {}}


def launching_ops(prof, steps: int, most: int = 12) -> dict:
    """For the kernels launched most often, the host ops that launch them (the op and its two enclosing ones),
    with launches per step: where a profile without a CUDA graph shows which code runs each small kernel."""
    by_kernel: dict[str, dict[str, int]] = {}
    for event in prof.events():
        for kernel in getattr(event, "kernels", []):
            chain, parent = [event.name], event.cpu_parent
            while parent is not None and len(chain) < 3:
                chain.append(parent.name)
                parent = parent.cpu_parent
            ops, key = by_kernel.setdefault(kernel.name[:60], {}), " < ".join(chain)
            ops[key] = ops.get(key, 0) + 1
    frequent = sorted(by_kernel, key=lambda k: -sum(by_kernel[k].values()))[:most]
    return {k: {chain: n // steps for chain, n in sorted(by_kernel[k].items(), key=lambda x: -x[1])[:4]}
            for k in frequent}


def idle_between_kernels(prof, steps: int) -> dict:
    """GPU time per step with no kernel running, from the profiled kernels' start and end times: short gaps (under
    20 us: the turnaround from one kernel to the next, inside a CUDA graph or a queue the host keeps full) apart
    from longer ones (the GPU waiting for the host), with the kernels on either side of the longest."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    short = long = 0.0
    gaps = []
    end, before = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        gap = start - end
        if gap > 0:
            if gap < 20:
                short += gap
            else:
                long += gap
                gaps.append((gap, before, name))
        if stop > end:
            end, before = stop, name
    gaps.sort(reverse=True)
    return {"short_gaps_ms": round(short / 1e3 / steps, 2), "long_gaps_ms": round(long / 1e3 / steps, 2),
            "long_gaps": len(gaps) // steps,
            "longest": [{"us": round(g, 1), "after": a, "before": b} for g, a, b in gaps[:8]]}


def loss_curves(args, log) -> dict:
    """Variants (the fused path and the eager reference by default) trained side by side: same data, seed and
    schedule, the --curve-config model (320m) at l=4096; differences are taken against the first variant."""
    found = sorted(Path(args.loss_curve).resolve().glob("*.idx"))
    prefixes = "[" + ",".join(str(p.with_suffix("")) for p in found) + "]"
    common = ["train.seq_length=4096", "model.max_seq_length=4096", "train.micro_batch_size=4",
              "train.global_batch_size=4", f"train.steps={args.curve_steps}", "train.eval_interval=0",
              "train.eval_iters=0", "logging.interval=1", "logging.tensorboard=false", "checkpoint.interval=0",
              "checkpoint.save_at_end=false", "checkpoint.resume=none", f"data.prefixes={prefixes}",
              "data.split=100,0,0"]
    curves, curve_config = {}, f"configs/{args.curve_config}.yaml"
    variants = args.curve_variants.split(",")
    for variant in variants:
        run_dir = Path(args.work) / f"curve-{variant}"
        cmd = [sys.executable, "-m", "transxssm_megatron.cli", "train", "--config", curve_config, *common,
               f"logging.run_dir={run_dir}", *VARIANTS[variant]]
        rc, wall = run(cmd, log, args.timeout, GpuSlot(0))
        records, _ = read_metrics(run_dir / "metrics.jsonl")
        curves[variant] = {"command": " ".join(cmd), "exit_code": rc, "wall_s": round(wall, 1),
                           "loss": [r["loss"] for r in records if "loss" in r]}
    n = min(len(c["loss"]) for c in curves.values())
    tail = slice(max(0, n - 50), n)
    first = curves[variants[0]]["loss"]
    diffs = {v: [abs(x - y) for x, y in zip(first, curves[v]["loss"])] for v in variants[1:]}
    return {"data": prefixes, "config": curve_config, "steps": n, **curves, "against": variants[0],
            "max_abs_diff": {v: max(d, default=None) for v, d in diffs.items()},
            "mean_abs_diff_last_50": {v: statistics.mean(d[tail]) if n else None for v, d in diffs.items()},
            "mean_loss_last_50": {v: statistics.mean(c["loss"][tail]) if n else None for v, c in curves.items()}}


def measure_row(row: str, runs: list[tuple[str, int]], args, log, slot: GpuSlot) -> tuple[dict, list]:
    """One row on one slot (one GPU, or --nproc of them): each run of ours, then the baseline script, then the
    profiles asked for."""
    config, arch, size, seq, mbs = ROWS[row]
    entry = {"model": f"{config.split('_')[0] if '_' in config else 'transxssm'}_{size}", "seq_length": seq,
             "micro_batch_size": mbs, **({"processes": args.nproc} if args.nproc > 1 else {}),
             **({"gpu_index": slot.index} if args.gpus > args.nproc else {}), "variants": {}}
    for variant, acc in runs:
        name = f"{variant}/acc{acc}"
        entry["variants"][name] = ours(row, variant, acc, args, log, slot)
        print(f"[bench] {row} {name}: {entry['variants'][name]['tokens_per_s']}", flush=True)
    entry["anchor"] = anchor(row, args, log, slot)
    # The headline: the graph where measured (the one-GPU default), else the fused launches, at the largest
    # accumulation measured, and the same at one micro-batch per step (the baseline script's step).
    default = "graph" if any(v == "graph" for v, _ in runs) else "fused"
    accs = sorted(acc for v, acc in runs if v == default) or [1]
    main = entry["variants"].get(f"{default}/acc{accs[-1]}", {})
    strict = entry["variants"].get(f"{default}/acc1", {})
    entry.update(ours_variant=default, micro_batches_per_step=accs[-1],
                 ours_tokens_per_s=main.get("tokens_per_s"),
                 ours_tokens_per_s_per_gpu=main.get("tokens_per_s_per_gpu"), ours_mfu=main.get("mfu"),
                 mem_gib=main.get("mem_gib"),
                 ours_tokens_per_s_one_micro_batch_per_step=strict.get("tokens_per_s"),
                 anchor_tokens_per_s=(entry["anchor"] or {}).get("tokens_per_s"),
                 anchor_mem_gib=(entry["anchor"] or {}).get("mem_gib"))
    profiles = []
    for variant in filter(None, args.profile.split(",")):
        cmd = [sys.executable, __file__, "--out", str(args.out), "--profile-only", row, variant,
               "--work", args.work, *(f"--override={o}" for o in args.override)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=slot.env)
        log.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PROFILE ")), None)
        profiles.append(json.loads(line[8:]) if line else
                        {"row": row, "variant": variant, "error": proc.stderr[-800:]})
    return entry, profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for train-speed.json and the logs")
    parser.add_argument("--rows", default="320m_4k,1.3b_4k", help=f"comma-separated, from: {', '.join(ROWS)}; "
                        "empty: none")
    parser.add_argument("--variants", default="fused", help=f"comma-separated, from: {', '.join(VARIANTS)}; "
                        "VARIANT/accN fixes the micro-batches per step of that run")
    parser.add_argument("--anchor", help="the baseline script (anchor_compiled.py); omitted: no baseline runs")
    parser.add_argument("--accumulation", default="1", help="micro-batches per optimizer step, comma-separated")
    parser.add_argument("--micro-batches", type=int, default=60, help="micro-batches per run of ours")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run of ours (repeatable), e.g. model.ss_chunk_size=128")
    parser.add_argument("--anchor-steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per run")
    parser.add_argument("--profile", default="", help="variants to profile (one step each) per row, e.g. fused")
    parser.add_argument("--profile-only", nargs=2, metavar=("ROW", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--loss-curve", metavar="DATA_DIR", help="folder of preprocessed prefixes (*.bin/.idx): also "
                        "train the --curve-config model fused and reference side by side on them and compare the loss "
                        "curves")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--curve-config", default="320m", help="the model of --loss-curve: a config of configs/")
    parser.add_argument("--curve-variants", default="fused,reference",
                        help="variants trained for --loss-curve, compared with the first (names as for --variants)")
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/transxssm_speed"))
    parser.add_argument("--gpus", type=int, help="GPUs of this machine to spread the rows over: each row (its runs, "
                        "then its baseline) on --nproc GPUs, the next row on the next ones free (default: --nproc)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run of ours, under torchrun: "
                        "data-parallel unless --override sets parallel.tp / pp / cp; tokens/s per GPU is compared "
                        "with the one-GPU baseline")
    args = parser.parse_args()
    if args.profile_only:  # child process of --profile: print the breakdown as one JSON line
        print("PROFILE " + json.dumps(profile(*args.profile_only, args)), flush=True)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    runs = []   # (variant, micro-batches per step): "graph/acc8" names both, "graph" takes every --accumulation
    for item in args.variants.split(","):
        variant, _, acc = item.partition("/acc")
        runs += [(variant, int(acc))] if acc else [(variant, int(a)) for a in args.accumulation.split(",")]
    curve = args.curve_variants.split(",") if args.loss_curve else []
    unknown = [r for r in rows if r not in ROWS] + \
        [v for v in [v for v, _ in runs] + [p.partition("/acc")[0] for p in args.profile.split(",")] + curve
         if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown row or variant: {', '.join(unknown)}")
    args.gpus = args.gpus or args.nproc
    if args.nproc < 1 or args.gpus < args.nproc:
        parser.error(f"--gpus {args.gpus} --nproc {args.nproc}: each row needs --nproc GPUs (1 or more)")
    if args.nproc > 1 and args.profile:
        parser.error("--profile traces one process: leave it out with --nproc > 1")
    if args.gpus > 1:
        import torch

        if torch.cuda.device_count() < args.gpus:
            parser.error(f"--gpus {args.gpus}: this machine shows {torch.cuda.device_count()} GPU(s)")
    if args.loss_curve and (len(curve) < 2 or len(set(curve)) < len(curve)):
        parser.error(f"--curve-variants needs two or more different variants, got {args.curve_variants!r}")
    if args.loss_curve and not (REPO / "configs" / f"{args.curve_config}.yaml").is_file():
        parser.error(f"--curve-config {args.curve_config}: no configs/{args.curve_config}.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.anchor:
        args.anchor = str(Path(args.anchor).resolve())
    path = args.out / "train-speed.json"
    result = {"benchmark": "train-speed", **environment("triton", "megatron.core"), "overrides": args.override,
              "gpus": args.gpus, "nproc": args.nproc, "rows": [], "profiles": []}

    def measure(row: str, slot: GpuSlot) -> tuple[dict, list]:
        with open(args.out / f"train-speed-{row}.log", "a") as log:
            return measure_row(row, runs, args, log, slot)

    def save(done: list) -> None:
        result["rows"] = [entry for entry, _ in filter(None, done)]
        result["profiles"] = [p for _, profiles in filter(None, done) for p in profiles]
        path.write_text(json.dumps(result, indent=1))

    on_gpus(rows, args.gpus, measure, save, per_item=args.nproc)
    if args.loss_curve:
        with open(args.out / "train-speed.log", "a") as log:
            result["loss_curve"] = loss_curves(args, log)
        path.write_text(json.dumps(result, indent=1))
    print(f"\n{'row':<22}{'variant':<16}{'tok/s':>10}{'MFU':>7}{'GiB':>6}{'anchor':>10}{'ratio':>7}")
    for entry, row in zip(result["rows"], rows):
        for name, v in entry["variants"].items():
            a = entry["anchor_tokens_per_s"]
            ratio = f"{v['tokens_per_s_per_gpu'] / a:.2f}" if a and v["tokens_per_s"] else "-"
            fmt = lambda x, f: f.format(x) if x is not None else "-"
            print(f"{row:<22}{name:<16}{fmt(v['tokens_per_s'], '{:,.0f}'):>10}{fmt(v['mfu'], '{:.1%}'):>7}"
                  f"{fmt(v['mem_gib'], '{:.0f}'):>6}{fmt(a, '{:,.0f}'):>10}{ratio:>7}")
    if "loss_curve" in result:
        c = result["loss_curve"]
        print(f"loss curves over {c['steps']} steps against {c['against']}: max |difference| {c['max_abs_diff']}, "
              f"mean over the last 50 {c['mean_abs_diff_last_50']}, mean loss {c['mean_loss_last_50']}")
    for p in result["profiles"]:
        if "kinds" in p:
            parts = ", ".join(f"{n.split(' (')[0]} {k['ms']:.1f}" for n, k in p["kinds"].items() if k["ms"] > 0.05)
            print(f"profile {p['row']} {p['variant']}: wall {p['wall_ms_per_step']} ms, GPU {p['gpu_ms_per_step']} ms: "
                  f"{parts}; idle {p['idle']['short_gaps_ms']} ms in short gaps, {p['idle']['long_gaps_ms']} in "
                  f"{p['idle']['long_gaps']} long ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
