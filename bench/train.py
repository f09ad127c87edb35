"""GPU training benchmarks of the pretraining loop: layouts, checkpoints across layout changes, real data.

    python bench/train.py --out DIR [--data DIR] [--only 320m_1gpu,parallel,1.3b_1gpu] [--stages tp2,pp2_vpp2,pp2_dp2]

With the package installed. --data (default runs/bench-data) holds the embedded sample corpus tokenized into
<subset>.bin/.idx; when it is missing and the offline assets are there (.assets/, `bash scripts/setup.sh`), it is
made first with the preprocessing tool. (Throughput beside a compiled baseline: bench/train_speed.py.)

Scenarios (each a real `transxssm train` under torchrun, bf16, real data = the preprocessed embedded sample):
  320m_1gpu   320m at l=4096 on 1 GPU, a few hundred steps: tokens/s, TFLOP/s, MFU, memory, loss curve; the
              distributed optimizer's checkpoint at the time limit, then a resumed run of a few steps
  parallel    320m at l=4096: TP=2 (steps 0-20, checkpoint) -> resume at PP=2 x VPP=2 (20-40) -> resume at DP=2
              (40-60) on 2 GPUs [-> resume at PP=2 x DP=2 on 4 GPUs (60-80)], distributed optimizer over NCCL; checks that the
              loss continues across each change of layout. --stages runs some of them; a later call with
              --keep-work (same OUT_DIR and BENCH_WORK) runs the rest from the saved checkpoints
  1.3b_1gpu   1.3b at l=4096 on 1 GPU: tokens/s, TFLOP/s, MFU, memory
Each writes OUT_DIR/train_<scenario>.json (date, commit, GPU, versions, commands, results); all logs go to
OUT_DIR/train_logs.txt. A run that outlives its time limit gets SIGUSR2 first (every rank prints its Python
stacks into the log: where it hangs), then is killed. MFU uses the FLOP count of transxssm_megatron/training/metrics.py (docs/training.md)
against 989 TFLOP/s dense bf16 per H200.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from run_record import environment  # noqa: E402
from transxssm_preprocess.sample import SUBSETS  # noqa: E402  (the sample's three SmolLM-Corpus subsets)


class Runner:
    def __init__(self, out: Path, data: Path, cpu_smoke: bool = False, keep_work: bool = False):
        self.cpu_smoke = cpu_smoke
        self.out = out
        self.data = data
        self.log = open(out / "train_logs.txt", "a")
        self.work = Path(os.environ.get("BENCH_WORK", "/tmp/transxssm_bench"))
        if not keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)

    def prefixes(self) -> str:
        return "[" + ", ".join(str(self.data / s) for s in SUBSETS) + "]"

    def train(self, name: str, gpus: int, config: str, overrides: list[str], run_dir: Path,
              timeout_s: float) -> dict:
        """One `transxssm train` under torchrun; returns the command, exit code, wall time, metrics records."""
        if self.cpu_smoke:  # same scenario at toy size on CPU/gloo: checks this script, not performance
            config = "configs/tiny.yaml"
            overrides = [o for o in overrides if not o.startswith(("train.seq_length", "model.max_seq_length"))]
            overrides += ["train.seq_length=64", "train.device=cpu", "train.time_limit_minutes=1.5"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "transxssm_megatron.cli", "train", "--config", config,
               f"data.prefixes={self.prefixes()}", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
               *overrides]
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            dump_stacks_and_kill(proc)
            rc = "timeout"
        wall = time.monotonic() - started
        records = read_records(run_dir / "metrics.jsonl")
        print(f"[bench] {name}: exit {rc} in {wall:.0f} s, {len(records)} metric records", flush=True)
        return {"command": " ".join(cmd), "exit_code": rc, "wall_s": round(wall, 1), "records": records}


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the ranks torchrun started), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def dump_stacks_and_kill(proc: subprocess.Popen) -> None:
    """A hung run: every rank prints its Python stacks (faulthandler on SIGUSR2, see cli.py), then all die."""
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
    time.sleep(5)
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def summarize(records: list[dict], skip_first: int = 1) -> dict:
    """Steady-state throughput (median over logged intervals after the first) and the loss curve."""
    # one record per step, the last written: a resumed run logs again the steps after its checkpoint
    train = sorted({r["step"]: r for r in records if "loss" in r}.values(), key=lambda r: r["step"])
    steady = train[skip_first:] or train
    med = lambda key: statistics.median([r[key] for r in steady if key in r]) if any(key in r for r in steady) \
        else None
    val = sorted({r["step"]: (r["step"], r["val_loss"]) for r in records if "val_loss" in r}.values())
    return {
        "steps": train[-1]["step"] if train else 0,
        "tokens_per_s": med("tokens_per_s"), "tflops_per_gpu": med("tflops_per_device"), "mfu": med("mfu"),
        "step_time_s": med("step_time_s"),
        "mem_peak_gib": max((r.get("mem_peak_gib", 0) for r in train), default=None),
        "loss_first": train[0]["loss"] if train else None, "loss_last": train[-1]["loss"] if train else None,
        "loss_curve": [(r["step"], round(r["loss"], 4)) for r in train],
        "val_loss": val, "skipped_total": train[-1].get("skipped_total", 0) if train else None,
    }


def write(out: Path, name: str, payload: dict) -> None:
    import torch

    payload = {"benchmark": name, **environment("triton", "megatron.core"), "gpus": torch.cuda.device_count(),
               **payload}
    (out / f"train_{name}.json").write_text(json.dumps(payload, indent=1))


L4096 = ["train.seq_length=4096", "model.max_seq_length=4096"]


def bench_320m_1gpu(r: Runner, out: Path) -> None:
    run_dir = r.work / "320m_1gpu"
    common = [*L4096, "train.steps=300", "train.micro_batch_size=4", "train.global_batch_size=8",
              "train.eval_interval=100", "train.eval_iters=4", "logging.interval=10", "checkpoint.interval=0",
              "checkpoint.save_at_end=false", "parallel.use_distributed_optimizer=true"]
    res = r.train("320m_1gpu", 1, "configs/320m.yaml",
                  [*common, "checkpoint.resume=none", "train.time_limit_minutes=1.5"], run_dir, timeout_s=240)
    summary = summarize(res["records"])
    # The time limit saves a checkpoint (distributed optimizer, dist_checkpointing); a second run resumes from it.
    resumed = r.train("320m_1gpu_resume", 1, "configs/320m.yaml",
                      [*common, "checkpoint.resume=auto", "train.time_limit_minutes=0.3"], run_dir, timeout_s=150)
    after = [rec for rec in resumed["records"][len(res["records"]):] if "loss" in rec]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) \
        if (run_dir / "checkpoints").is_dir() else []
    write(out, "320m_1gpu", {"scenario": "320m, l=4096, 1 GPU, bf16, global batch 8 x 4096 tokens, real data "
                                         "(the embedded sample corpus, repeated), distributed optimizer; "
                                         "checkpoint at the time limit, then resumed",
                             "command": res["command"], "exit_code": res["exit_code"], "wall_s": res["wall_s"],
                             **summary,
                             "resume": {"command": resumed["command"], "exit_code": resumed["exit_code"],
                                        "wall_s": resumed["wall_s"], "checkpoints": checkpoints,
                                        "first_step_after_resume": after[0]["step"] if after else None,
                                        "loss_curve": [(rec["step"], round(rec["loss"], 4)) for rec in after]}})


PARALLEL_STAGES = {   # name: (GPUs, overrides); each resumes from the previous one's checkpoint
    "tp2": (2, ["parallel.tp=2", "parallel.pp=1", "train.exit_after_steps=20"]),
    "pp2_vpp2": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "train.exit_after_steps=40"]),
    "dp2": (2, ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=null", "train.exit_after_steps=60"]),
    "pp2_dp2": (4, ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=null"]),
}


def bench_parallel(r: Runner, out: Path, gpus: int, stages: list[str]) -> None:
    run_dir = r.work / "parallel"
    base = [*L4096, "train.steps=80", "train.micro_batch_size=2", "train.global_batch_size=16",
            "train.eval_interval=20", "train.eval_iters=2", "train.eval_at_start=true", "logging.interval=5",
            "checkpoint.interval=20",
            "checkpoint.resume=auto", "parallel.use_distributed_optimizer=true"]
    path = out / "train_parallel.json"
    results = json.loads(path.read_text())["stages"] if path.is_file() else {}   # earlier calls (--keep-work)
    metrics = run_dir / "metrics.jsonl"
    for name in stages:
        n, extra = PARALLEL_STAGES[name]
        if n > gpus:
            print(f"[bench] parallel_{name}: skipped ({n} GPUs needed, {gpus} visible)", flush=True)
            continue
        seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        start = max([rec["step"] for rec in read_records(metrics) if "loss" in rec], default=0)
        res = r.train(f"parallel_{name}", n, "configs/320m.yaml", [*base, *extra], run_dir, timeout_s=240)
        records = res["records"][seen:]  # metrics.jsonl is shared by the stages: this stage's lines only
        at_start = next(((r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["step"] == start), None)
        results[name] = {"gpus": n, "command": res["command"], "exit_code": res["exit_code"], "wall_s": res["wall_s"],
                         **summarize([r for r in records if r["step"] > start]), "val_loss_at_start": at_start}
        if res["exit_code"] != 0:
            break
    # Resume across a layout change: each stage validates at its last step, the next one validates the
    # loaded weights before its first step; the two validation losses must agree (bf16 reduction order aside).
    names = [n for n in PARALLEL_STAGES if n in results]
    continuity = []
    for a, b in zip(names, names[1:]):
        if not results[a]["val_loss"] or not results[b]["val_loss_at_start"]:
            continue
        (step_a, before), (step_b, after) = results[a]["val_loss"][-1], results[b]["val_loss_at_start"]
        continuity.append({"from": a, "to": b, "step": step_b, "val_loss_saved_run": before,
                           "val_loss_after_resume": after, "abs_diff": round(abs(after - before), 5),
                           "same_step": step_a == step_b})
    write(out, "parallel", {"scenario": "320m, l=4096, bf16, distributed optimizer over NCCL: "
                                        + " -> resume at ".join(f"{k} ({results[k]['gpus']} GPUs)" for k in names),
                            "stages": results, "resume_continuity": continuity})


def bench_1p3b_1gpu(r: Runner, out: Path) -> None:
    run_dir = r.work / "1.3b_1gpu"
    overrides = [*L4096, "train.steps=40", "train.micro_batch_size=2", "train.global_batch_size=8",
                 "train.eval_interval=0", "train.eval_iters=0", "logging.interval=5", "checkpoint.interval=0",
                 "checkpoint.save_at_end=false", "checkpoint.resume=none", "train.time_limit_minutes=1.0"]
    res = r.train("1.3b_1gpu", 1, "configs/1.3b.yaml", overrides, run_dir, timeout_s=170)
    write(out, "1.3b_1gpu", {"scenario": "1.3b, l=4096, 1 GPU, bf16, global batch 8 x 4096 tokens, real data",
                             "command": res["command"], "exit_code": res["exit_code"], "wall_s": res["wall_s"],
                             **summarize(res["records"])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results and logs")
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "bench-data",
                        help="folder with the preprocessed sample: <subset>.bin/.idx (made from .assets when missing)")
    parser.add_argument("--only", default="320m_1gpu,parallel,1.3b_1gpu")
    parser.add_argument("--stages", default=",".join(PARALLEL_STAGES),
                        help="stages of the parallel scenario, in order (those needing more GPUs are skipped)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep BENCH_WORK (checkpoints of an earlier call) instead of starting clean")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every scenario with tiny on CPU (gloo)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for subset in SUBSETS:
        if not (args.data / f"{subset}.idx").is_file():
            sample = REPO / ".assets" / "sample" / subset
            if not sample.is_dir():
                print(f"error: {args.data / subset}.bin/.idx missing and no {sample} to make it from; run "
                      f"`bash scripts/setup.sh` (it assembles .assets) or pass --data", file=sys.stderr)
                return 2
            from transxssm_preprocess import preprocess

            args.data.mkdir(parents=True, exist_ok=True)
            preprocess([str(sample)], args.data / subset, str(REPO / ".assets/tokenizer/gpt-neox-20b.json"),
                       overwrite=True, progress=False)
    import torch

    gpus = 4 if args.cpu_smoke else torch.cuda.device_count()
    if gpus == 0:
        print("error: no GPU visible", file=sys.stderr)
        return 2
    r = Runner(args.out, args.data.resolve(), cpu_smoke=args.cpu_smoke, keep_work=args.keep_work)
    chosen = args.only.split(",")
    started = time.monotonic()
    if "320m_1gpu" in chosen:
        bench_320m_1gpu(r, args.out)
    if "parallel" in chosen:
        if gpus >= 2:
            bench_parallel(r, args.out, gpus, args.stages.split(","))
        else:
            print("[bench] parallel: skipped (fewer than 2 GPUs)", flush=True)
    if "1.3b_1gpu" in chosen:
        bench_1p3b_1gpu(r, args.out)
    print(f"[bench] all done in {time.monotonic() - started:.0f} s; results in {args.out}", flush=True)
    for path in sorted(args.out.glob("train_*.json")):
        data = json.loads(path.read_text())
        keys = ("tokens_per_s", "tflops_per_gpu", "mfu", "mem_peak_gib", "loss_first", "loss_last", "exit_code")
        print(path.name, {k: data.get(k) for k in keys if k in data} or
              {k: {kk: v.get(kk) for kk in keys} for k, v in data.get("stages", {}).items()},
              data.get("resume_continuity", ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
