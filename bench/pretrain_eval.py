"""Train, convert, evaluate, generate: the whole user path on one GPU, in one go, on a real corpus.

    python bench/pretrain_eval.py --out DIR --data PREFIX [--config configs/320m.yaml] [--steps 300]
                                  [--global-batch 64] [--limit 500] [--minutes 4.5]
                                  [--stages train,convert,eval,generate,niah] [--work DIR]

Runs, each as the CLI command a user would type (fresh processes, in order; a failed train or convert stops the rest):
  train     `transxssm train` on PREFIX (e.g. the train split of bench/package_corpus.py) for --steps steps of
            --global-batch x --seq-length tokens, CUDA graph on (on a GPU), time limit --minutes (the run saves
            and stops there);
  convert   `transxssm convert --to hf` of the last checkpoint;
  eval      `transxssm eval` on the paper's tasks, offline from .assets/eval, at most --limit items per task
            (MMLU: per subject), batch 64, TriviaQA answers capped at 16 tokens;
  generate  `transxssm generate` of three prompts, greedy, 48 tokens;
  niah      `transxssm niah` at --niah-lengths (1K, 2K, 4K), five depths, two trials.
--stages runs some of them (default all, in the order above): `--stages train,convert` and later, in another
process or on another day, `--stages eval,generate,niah` with the same --work, which keeps the trained run, its
export and the record of the stages already done (--work is emptied only when `train` runs).
Writes DIR/pretrain-eval.json (every command with its exit code and wall time; the training's token count and
losses; the scores beside the paper's; the generations; the NIAH grid), DIR/table.md and DIR/niah.png. Scores are
what they are for the tokens trained: a few tens of millions against the paper's tens of billions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("The capital of France is", "def fibonacci(n):", "In this tutorial we will learn how to")

from run_record import environment  # noqa: E402
from transxssm_megatron.hf.niah import NiahError, default_haystack_files  # noqa: E402
from transxssm_megatron.training.checkpoint_integrity import marked_folders  # noqa: E402
from transxssm_megatron.training.checkpointing import CheckpointManager  # noqa: E402
from transxssm_megatron.training.metrics import read_metrics  # noqa: E402


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint (COMPLETE marker), or None."""
    complete = marked_folders(run_dir / "checkpoints")
    return complete[-1] if complete else None


def stage(name: str, cmd: list[str], log, timeout_s: float, results: dict) -> subprocess.CompletedProcess | None:
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        rc = proc.returncode
        log.write(proc.stdout[-20000:] + proc.stderr[-5000:])
    except subprocess.TimeoutExpired:
        proc, rc = None, "timeout"
    results["stages"].append({"name": name, "command": " ".join(cmd), "exit_code": rc,
                              "wall_s": round(time.monotonic() - started, 1)})
    print(f"[bench] {name}: exit {rc} after {results['stages'][-1]['wall_s']} s", flush=True)
    return proc if rc == 0 else None


STAGES = ("train", "convert", "eval", "generate", "niah")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for pretrain-eval.json, table.md, niah.png")
    parser.add_argument("--data", help="dataset prefix (PREFIX.bin/.idx) to train on (needed by the train stage)")
    parser.add_argument("--config", default="configs/320m.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--niah-lengths", default="1024,2048,4096", help="comma-separated context lengths")
    parser.add_argument("--minutes", type=float, default=4.5, help="training time limit (saves and stops there)")
    parser.add_argument("--limit", type=int, default=500, help="items per eval task (MMLU: per subject)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transxssm_pretrain_eval"))
    args = parser.parse_args()
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages {args.stages}: unknown {sorted(set(stages) - set(STAGES))}; choose from {STAGES}")
    if "train" in stages and (args.data is None or not Path(args.data + ".idx").is_file()):
        parser.error(f"--data {args.data}: no {args.data}.idx; make one with bench/package_corpus.py or "
                     "transxssm-preprocess run")
    # what the later stages read, checked before minutes of training are spent
    if "eval" in stages and not (REPO / ".assets" / "eval").is_dir():
        parser.error(f"no {REPO / '.assets' / 'eval'} for the eval stage: run `bash scripts/setup.sh` (or leave "
                     "eval out of --stages)")
    if "niah" in stages:
        try:
            default_haystack_files()
        except NiahError as err:
            parser.error(f"the niah stage: {err}")
    record = args.work / "pretrain-eval.json"   # survives between invocations with --stages
    if "train" in stages:
        shutil.rmtree(args.work, ignore_errors=True)
        results = {"benchmark": "pretrain-eval", **environment("transformers", "lm_eval"), "stages": []}
    elif record.is_file():
        results = json.loads(record.read_text())
    else:
        parser.error(f"--work {args.work}: no pretrain-eval.json from an earlier `--stages train` run")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    run_dir, export = args.work / "run", args.work / "export"
    cli = [sys.executable, "-m", "transxssm_megatron.cli"]
    cuda = torch.cuda.is_available()   # the CUDA graph needs a GPU; elsewhere the same run, eagerly
    path = args.out / "pretrain-eval.json"

    def save() -> None:   # after every stage, so a run cut short keeps what it finished
        text = json.dumps(results, indent=1)
        record.write_text(text)
        path.write_text(text)

    ok = True
    with open(args.out / "pretrain-eval.log", "a") as log:
        if "train" in stages:
            train = cli + ["train", "--config", args.config, f"data.prefixes=[{Path(args.data).resolve()}]",
                           "data.split=100,0,0", f"train.seq_length={args.seq_length}",
                           f"model.max_seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch}",
                           f"train.global_batch_size={args.global_batch}",
                           f"train.steps={args.steps}", "train.eval_interval=0", "train.eval_iters=0",
                           f"train.cuda_graph={str(cuda).lower()}", f"train.time_limit_minutes={args.minutes}",
                           "logging.interval=10",
                           "logging.tensorboard=false", "checkpoint.interval=0", "checkpoint.resume=none",
                           f"logging.run_dir={run_dir}"]
            ok = stage("train", train, log, args.minutes * 60 + 240, results) is not None
            metrics = run_dir / "metrics.jsonl"
            records, _ = read_metrics(metrics) if metrics.is_file() else ([], 0)
            losses = [r for r in records if "loss" in r]
            checkpoint = last_checkpoint(run_dir)
            # the step the checkpoint holds (the time limit can stop the run between two logged steps)
            steps = CheckpointManager.step_of(checkpoint) if checkpoint else (losses[-1]["step"] if losses else 0)
            results["train"] = {"steps": steps, "tokens": steps * args.global_batch * args.seq_length,
                                "loss": [(r["step"], round(r["loss"], 4)) for r in losses],
                                "tokens_per_s": [r.get("tokens_per_s") for r in losses][-1:]}
            save()
        if ok and "convert" in stages:
            checkpoint = last_checkpoint(run_dir)
            ok = checkpoint is not None and stage("convert", cli + ["convert", "--to", "hf", "--quiet",
                                                                    str(checkpoint), str(export)],
                                                  log, 300, results) is not None
            save()
        if ok and "eval" in stages:
            eval_out = args.work / "eval"
            if stage("eval", cli + ["eval", "--model", str(export), "--offline-assets", str(REPO / ".assets/eval"),
                                    "--limit", str(args.limit), "--batch-size", "64", "--max-gen-toks", "16",
                                    "--out", str(eval_out)], log, 420, results):
                results["eval"] = json.loads((eval_out / "results.json").read_text())
            save()
        if (eval_table := args.work / "eval" / "table.md").is_file():
            shutil.copy(eval_table, args.out / "table.md")
        if ok and "generate" in stages:
            results["generations"] = []
            for prompt in PROMPTS:
                proc = stage("generate", cli + ["generate", "--checkpoint", str(export), "--prompt", prompt,
                                                "--max-new-tokens", "48"], log, 180, results)
                results["generations"].append({"prompt": prompt, "text": proc.stdout.strip() if proc else None})
                save()
        if ok and "niah" in stages:
            niah_out = args.work / "niah"
            if stage("niah", cli + ["niah", "--model", str(export), "--lengths", *args.niah_lengths.split(","),
                                    "--trials", "2", "--out", str(niah_out)], log, 300, results):
                niah = json.loads((niah_out / "niah.json").read_text())
                results["niah"] = {k: niah[k] for k in ("lengths", "depths", "trials", "accuracy", "mean_accuracy")}
            save()
        if (niah_png := args.work / "niah" / "niah.png").is_file():
            shutil.copy(niah_png, args.out / "niah.png")
    for s in results["stages"]:
        print(f"{s['name']:<10} exit {s['exit_code']!s:<8} {s['wall_s']:>7.1f} s")
    if (args.out / "table.md").is_file():
        print((args.out / "table.md").read_text())
    print(f"wrote {path}")
    return 0 if ok and all(s["exit_code"] == 0 for s in results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
