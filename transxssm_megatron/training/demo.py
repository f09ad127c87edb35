"""`transxssm demo`: the whole pipeline on the embedded sample, small enough for a 2-core CPU.

1. Tokenize the embedded SmolLM-Corpus sample (.assets/sample/<subset>/*.parquet, GPT-NeoX-20B tokenizer)
   into Megatron .bin/.idx datasets with transxssm_preprocess.
2. Train the `tiny` TransXSSM on a weighted blend of the three subsets for the first half of the steps,
   checkpoint, and stop (as a preempted or time-limited job would).
3. Start a second, fresh trainer with `--resume auto`: it loads the checkpoint (model, optimizer, scheduler,
   RNG, data position) and trains to the end.
4. Print the loss curve, the validation losses and where everything was written.
GPU when present (bf16), else CPU (fp32, gloo).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from transxssm_megatron.config import ConfigError

SUBSETS = {"cosmopedia-v2": 0.4, "fineweb-edu-dedup": 0.4, "python-edu": 0.2}
MARKER = ".transxssm-demo"
DEFAULT_OUT = "runs/demo"
DEFAULT_STEPS = 200


def missing_demo_data(prefixes: list[str]) -> list[str]:
    """The prefixes among `prefixes` that name the demo's data (<out>/data/<subset>) and do not exist yet:
    configs/tiny.yaml trains on what `transxssm demo` tokenized."""
    return [p for p in prefixes if Path(p).parent.name == "data" and Path(p).name in SUBSETS
            and not Path(f"{p}.idx").is_file()]


def demo_config(out: Path, prefixes: list[str], weights: list[float], steps: int) -> dict:
    """The demo's run config: configs/tiny.yaml's model and recipe, with a CPU-sized batch and sequence.

    512 tokens per step: on 2 CPU cores a step of the tiny model costs ~0.5 s, most of it in the 50,304-word
    LM head, so 200 steps take ~2 minutes of compute. Eager on a GPU too (train.cuda_graph=false): the demo shows
    the workflow, not speed, and its two trainers share one process."""
    return {
        "model": {"preset": "tiny", "architecture": "transxssm"},
        "train": {"steps": steps, "seq_length": 128, "micro_batch_size": 4, "global_batch_size": 4,
                  "eval_interval": max(steps // 4, 1), "eval_iters": 4, "cuda_graph": False},
        "optim": {"lr": 2e-3, "min_lr_ratio": 0.1, "warmup_fraction": 0.1, "weight_decay": 0.01, "clip_grad": 1.0},
        "data": {"mode": "gpt", "prefixes": prefixes, "weights": weights, "split": "95,5,0"},
        "checkpoint": {"interval": max(steps // 4, 1), "keep_last": 2, "resume": "auto"},
        "logging": {"run_dir": str(out / "run"), "interval": max(steps // 20, 1)},
    }


def find_assets() -> Path:
    """The offline asset folder: $TRANSXSSM_ASSETS, ./.assets, or the repository's .assets."""
    candidates = [os.environ.get("TRANSXSSM_ASSETS"), ".assets",
                  str(Path(__file__).resolve().parents[2] / ".assets")]
    for cand in candidates:
        if cand and (Path(cand) / "sample").is_dir() and (Path(cand) / "tokenizer").is_dir():
            return Path(cand)
    raise ConfigError("demo: no offline assets found (.assets/sample and .assets/tokenizer). Run "
                      "`bash scripts/setup.sh` (it runs `transxssm-preprocess assets --out .assets`) or set "
                      "TRANSXSSM_ASSETS=/path/to/assets")


def preprocess_sample(assets: Path, data_dir: Path) -> tuple[list[str], list[float], int]:
    """Tokenize each sample subset once into data_dir/<subset>.bin/.idx; returns prefixes, weights, tokens."""
    from transxssm_preprocess import preprocess
    from transxssm_preprocess.pipeline import summary_line

    tokenizer = assets / "tokenizer" / "gpt-neox-20b.json"
    prefixes, weights, tokens = [], [], 0
    for subset, weight in SUBSETS.items():
        source = assets / "sample" / subset
        if not source.is_dir():
            continue
        prefix = data_dir / subset
        stats_file = Path(f"{prefix}.stats.json")
        reused = stats_file.is_file() and Path(f"{prefix}.idx").is_file()
        if not reused:
            # No progress bar (the demo prints its own steps), but always the summary: documents, tokens and
            # what was skipped, so that nothing is dropped silently.
            preprocess([str(source)], prefix, str(tokenizer), overwrite=True, progress=False)
        stats = json.loads(stats_file.read_text())
        print(f"[demo]     {'reused ' if reused else ''}{summary_line(stats)}", flush=True)
        tokens += int(stats.get("tokens", 0))
        prefixes.append(str(prefix))
        weights.append(weight)
    if not prefixes:
        raise ConfigError(f"demo: {assets / 'sample'} holds none of the subsets {', '.join(SUBSETS)}")
    return prefixes, weights, tokens


def _curve(history: list[dict], width: int = 40) -> list[str]:
    points = [(h["step"], h["loss"]) for h in history if math.isfinite(h.get("loss", float("nan")))]
    if not points:
        return []
    hi, lo = max(p[1] for p in points), min(p[1] for p in points)
    span = max(hi - lo, 1e-9)
    return [f"    step {s:>5d}  loss {v:7.4f}  " + "#" * max(1, round((v - lo) / span * width)) for s, v in points]


def _transxssm_command() -> str:
    """`transxssm` when it is on PATH, else the script beside this interpreter (`.venv/bin/transxssm` when the
    demo ran through scripts/demo.sh without an activated environment)."""
    if shutil.which("transxssm"):
        return "transxssm"
    script = Path(sys.executable).parent / "transxssm"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def run_demo(out: str = DEFAULT_OUT, steps: int | None = None, fresh: bool = True) -> int:
    from transxssm_megatron.training.loop import train
    from transxssm_megatron.training.metrics import read_metrics
    from transxssm_megatron.training.run_config import RunConfig

    started = time.monotonic()
    out = Path(out)
    steps = steps or DEFAULT_STEPS
    if steps < 2:
        raise ConfigError("demo --steps: needs at least 2 (half before the checkpoint, half after the resume)")
    if fresh and out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise ConfigError(f"demo --out {out}: exists and was not made by the demo; choose another folder")
        shutil.rmtree(out / "run", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()

    assets = find_assets()
    print(f"[demo] 1/4 tokenizing the embedded sample ({assets / 'sample'}) -> {out / 'data'}", flush=True)
    prefixes, weights, tokens = preprocess_sample(assets, out / "data")
    print(f"[demo]     {len(prefixes)} datasets, {tokens:,} tokens, blend weights {weights}", flush=True)

    cfg_dict = demo_config(out, prefixes, weights, steps)
    half = steps // 2
    first = RunConfig.from_dict({**cfg_dict, "train": {**cfg_dict["train"], "exit_after_steps": half}})
    print(f"[demo] 2/4 training tiny TransXSSM for steps 0 -> {half}, then checkpoint and stop", flush=True)
    part1 = train(first)
    print(f"[demo] 3/4 fresh trainer, --resume auto: steps {part1['step']} -> {steps}", flush=True)
    part2 = train(RunConfig.from_dict(cfg_dict))

    run_dir = Path(part2["run_dir"])
    history, val = read_metrics(run_dir / "metrics.jsonl")  # the last record of a step redone after the resume
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    lines = [f"[demo] 4/4 done in {minutes}m{seconds:02d}s",
             f"  resumed from: {part2['resumed_from']} (at step {part1['step']})",
             "  training loss (mean over each logging interval):", *_curve(history)]
    if val:
        lines.append("  validation loss: " + ", ".join(f"step {v['step']}: {v['val_loss']:.4f}" for v in val))
    if history:
        lines.append(f"  loss {history[0]['loss']:.3f} (step {history[0]['step']}) -> {history[-1]['loss']:.3f} "
                     f"(step {history[-1]['step']}); skipped steps: {part2['skipped_total']}")
    lines += ["  written:",
              f"    data          {out / 'data'}/<subset>.bin/.idx/.stats.json",
              f"    run config    {run_dir / 'config.yaml'}",
              f"    metrics       {run_dir / 'metrics.jsonl'}" + (f" and {run_dir / 'tensorboard'}"
                                                                 if (run_dir / 'tensorboard').exists() else ""),
              f"    checkpoints   {run_dir / 'checkpoints'} (latest: {part2['checkpoint']})",
              f"  continue training: {_transxssm_command()} train --config {run_dir / 'config.yaml'} "
              f"train.steps={2 * steps}"]
    print("\n".join(lines), flush=True)
    return 0
