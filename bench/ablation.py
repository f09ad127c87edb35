"""The position-encoding ablation of the paper's Table 2 at small scale: SS-only and hybrid models with each SS
positional mechanism, and attention only, trained alike and compared by validation perplexity on held-out data.

    python bench/ablation.py --data DIR --valid DIR --out OUT [--configs all|NAME,NAME] [--seeds 0,1,2]
                             [--steps 300] [--seq-length 8192] [--layers 8] [--hidden 256] [--heads 4]
                             [--micro-batch 4] [--global-batch 8] [--eval-interval N] [--eval-iters 8] [--lr 1e-3]
                             [--time-limit-per-run 150] [--parallel N] [--work DIR] [--rerun]
    python bench/ablation.py --out OUT --report

--data and --valid are what `bench/package_corpus.py --out DIR` writes: a folder holding train.bin/.idx (resp.
valid.bin/.idx), or a prefix. --valid defaults to the --data folder. --work (default OUT/data) holds the dataset
index cache; put it outside OUT when OUT is copied somewhere afterwards.

The seven configurations (paper: d = 256, l = 8192, 8k steps, validation perplexity):

    name              layers (8)              SS block                          paper
    ss-conv1d_d       8 SS                    conv1d + D, no RoPE on B/C        8.56
    ss-none           8 SS                    nothing: the decay A only (a_t)   8.62
    ss-rope           8 SS                    Unified RoPE on B/C               8.33
    hybrid-conv1d_d   7 SS + attention (7)    conv1d + D, no RoPE on B/C        8.48
    hybrid-none       7 SS + attention (7)    the decay A only                  8.56
    hybrid-rope       7 SS + attention (7)    Unified RoPE on B/C (TransXSSM)   8.18
    attention-only    8 attention             (RoPE on Q/K)                     8.38

How the variants are expressed. The SS block is the paper's (docs/model.md §2): no z gate and no dt_bias in every
variant, and `model.ss_positional` alone decides the positional mechanism. `conv1d_d` is defined as the causal
conv1d plus the D skip without RoPE ("Mamba-2 style: conv1d and D", docs/model.md §2), `none` leaves only the decay
A ("a_t", SPEC §2), `rope` rotates B and C. Every SS option (ss_positional, ss_conv1d, ss_d_skip, ss_z_gate,
ss_dt_bias) is passed explicitly, conv1d and D on exactly when the mode is `conv1d_d`, so no architecture default
enters: the three SS variants differ only in the positional mechanism. SS-only is `model.architecture=mamba2`, whose
only other effect is its layer pattern (every layer SS; `ModelConfig.layer_kinds`); its Mamba-2 defaults (z gate,
dt_bias) are overridden to the TransXSSM block above. (`transxssm` with attention_period 9 and offset 8 would also
leave 8 layers without attention, but hides the intent and depends on the number of layers.) The hybrid is
`architecture=transxssm` with the same SS options: the same model with attention in place of the SS mixer at layer
7 (offset 7 of every 8, docs/model.md §4). Attention-only is `architecture=transformer` (RoPE on Q/K). Embedding,
SwiGLU FFN, norms, skip weights, initialisation, data, schedule and seed are the same for all seven. Sizes: d =
--hidden, H = --heads (P = d/H = 64), N = --state-size (128, docs/model.md §2), G = H, FFN 3d (ours; the paper gives
none). Parameters differ slightly: conv1d_d adds the conv weights, its bias and D (6.4K per layer at d = 256), and an
attention mixer (4d^2) is smaller than an SS mixer (6d^2 + dH), so attention-only has ~1.1M fewer of ~21M.

Held-out validation. The runs train on all of train.bin (`data.prefixes`) and validate on valid.bin
(`data.valid_prefixes`): files never trained on, as package_corpus splits by file. Validation takes --eval-iters
global batches of the valid split, the same samples at every evaluation and for every configuration of a seed (the
seed also sets the data order and which validation samples are drawn, as `train.seed` seeds the datasets too).

Runs. Each configuration x seed is a fresh `transxssm train` process (bf16 on GPU, the default fused path) with the
same tokens, steps, schedule (warmup 10%, cosine to 10%) and seed; validation every --eval-interval steps and at the
end. --time-limit-per-run passes train.time_limit_minutes (the loop stops after that long, compilation included;
such a run has no final validation and an unfinished schedule, and is marked in the table); the process is killed
--time-limit-per-run + 180 s after its start in any case. Order: the full set of seven with the first seed (most
important first), then the further seeds for --extra-seed-configs (default hybrid-rope, hybrid-conv1d_d,
attention-only), so a cut-off invocation still holds one full set. --parallel N runs N at a time on the same device
(each run its own dataset index cache under --work): a d = 256 run uses 4 GiB and a fraction of an H200, so several
fit at once; each run's tokens/s then shares the GPU (recorded with `parallel`), its perplexities do not change (on
CPU, in fp32, they are bitwise those of one-at-a-time runs). OUT/ablation.json and OUT/ablation.png are rewritten
after every run; runs already in OUT/ablation.json with the same settings are kept and not run again (--rerun runs
them again), so a second invocation with more seeds adds to the same table.

Writes OUT/ablation.json (date, commit, GPU, versions, the settings, per run: the command, exit code, status, wall
time, steps, tokens seen, tokens/s, MFU, the validation loss / perplexity curve and the final validation perplexity;
per configuration: mean and spread over seeds beside the paper's number), OUT/ablation.png (validation perplexity
curves, one colour per configuration, seeds as thin lines, their mean thick), OUT/runs/<name>-seed<k>/ (config.yaml,
metrics.jsonl, train.log), and prints the table. Absolute perplexities are not comparable with the paper's (another
corpus, far fewer tokens): the order of the configurations and their gaps are what to compare.

Time on one H200 (defaults: 300 steps x 8 x 8192 = 19.7M tokens per run; bench/results/ablation-2026-12-02.json):
0.54-0.79M tokens/s (8-18% MFU: narrow matmuls, the 50,304-row LM head, the SSD kernels), 44-67 s per run
with process start, data indices and validation, 7 minutes for the seven runs of one seed. The first run on a
fresh machine also compiles every kernel (88 s there), which is why the default time limit (150 s) is well above a
run's own time: it only guards against a run that hangs.

Runs cut short compare on equal terms at the last validation step every run reached (`common_step`: the same
tokens, and the same learning rate so far, since the schedule depends only on the step); the table gives the mean
perplexity there beside the final one, and the order at both. --report recomputes the summary, table and plot of
OUT/ablation.json without running anything (for a copy brought back from another machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from run_record import commit, environment  # noqa: E402
from transxssm_megatron.config import ModelConfig  # noqa: E402
from transxssm_megatron.training.metrics import read_metrics, train_flops_per_token  # noqa: E402

# name: (architecture, SS positional mode or None, the paper's validation perplexity, Table 2)
CONFIGS = {
    "ss-conv1d_d": ("mamba2", "conv1d_d", 8.56),
    "ss-none": ("mamba2", "none", 8.62),
    "ss-rope": ("mamba2", "rope", 8.33),
    "hybrid-conv1d_d": ("transxssm", "conv1d_d", 8.48),
    "hybrid-none": ("transxssm", "none", 8.56),
    "hybrid-rope": ("transxssm", "rope", 8.18),
    "attention-only": ("transformer", None, 8.38),
}
# The first seed's full set runs in this order: the paper's headline comparisons first.
RUN_ORDER = ["hybrid-rope", "hybrid-conv1d_d", "attention-only", "ss-rope", "ss-conv1d_d", "hybrid-none", "ss-none"]
EXTRA_SEED_CONFIGS = "hybrid-rope,hybrid-conv1d_d,attention-only"
KILL_MARGIN_S = 180  # process start, data indices, the last validation and checkpoint beyond the loop's time limit


class AblationError(ValueError):
    """A bad argument or unusable input; the message names it and what to do."""


# ---------------------------------------------------------------------------------------------------- data
def resolve_prefix(path: Path, name: str, option: str) -> str:
    """A folder holding NAME.bin/.idx, or a prefix (with or without .bin/.idx)."""
    if path.is_dir():
        prefix = path / name
    elif path.suffix in (".bin", ".idx"):
        prefix = path.with_suffix("")
    else:
        prefix = path
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise AblationError(f"{option} {path}: no {prefix}.bin/.idx; give the folder `python bench/package_corpus.py "
                            f"--out DIR` wrote, or a dataset prefix")
    return str(prefix)


def data_sources(train_prefix: str, valid_prefix: str) -> dict:
    """What the runs read (recorded with the settings); one-line errors for a broken or mismatched pair."""
    from transxssm_preprocess.integrity import DatasetError, check_dataset

    summaries = {}
    for option, name, prefix in (("--data", "train", train_prefix), ("--valid", "valid", valid_prefix)):
        try:
            summaries[name] = check_dataset(prefix)
        except DatasetError as err:
            raise AblationError(f"{option}: {err}") from None
    if summaries["train"].dtype != summaries["valid"].dtype:
        raise AblationError(f"--valid {valid_prefix}: tokens of {summaries['valid'].dtype}, --data has "
                            f"{summaries['train'].dtype}; tokenize both with the same tokenizer")
    return {name: {"prefix": str(Path(s.prefix).resolve()), "documents": s.documents, "tokens": s.tokens}
            for name, s in summaries.items()}


# ---------------------------------------------------------------------------------------------------- runs
def model_values(name: str, args) -> dict:
    """The model section of a configuration: sizes, architecture and every SS option (module docstring)."""
    architecture, positional, _ = CONFIGS[name]
    values = {"architecture": architecture, "hidden_size": args.hidden, "num_layers": args.layers,
              "num_attention_heads": args.heads, "num_query_groups": args.heads, "state_size": args.state_size,
              "ss_groups": args.heads, "ffn_hidden_size": args.ffn or 3 * args.hidden,
              "max_seq_length": args.seq_length}
    if positional is not None:
        conv = positional == "conv1d_d"
        values.update(ss_positional=positional, ss_conv1d=conv, ss_d_skip=conv, ss_z_gate=False, ss_dt_bias=False)
    return values


def model_overrides(name: str, args) -> list[str]:
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model_values(name, args).items()]


def train_command(name: str, seed: int, args, run_dir: Path) -> list[str]:
    t_limit = [f"train.time_limit_minutes={args.time_limit_per_run / 60:.4g}"] if args.time_limit_per_run else []
    return [sys.executable, "-m", "transxssm_megatron.cli", "train", "--config", "configs/tiny.yaml",
            *model_overrides(name, args),
            f"train.steps={args.steps}", f"train.seq_length={args.seq_length}",
            f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
            f"train.seed={seed}", f"train.eval_interval={args.eval_interval}", f"train.eval_iters={args.eval_iters}",
            "train.eval_at_start=false", f"train.device={args.device}", *t_limit,
            f"optim.lr={args.lr}", "optim.min_lr_ratio=0.1", "optim.warmup_fraction=0.1", "optim.weight_decay=0.01",
            "optim.clip_grad=1.0",
            "data.mode=gpt", f"data.prefixes=[{args.train_prefix}]", f"data.valid_prefixes=[{args.valid_prefix}]",
            "data.weights=null",
            f"data.cache_dir={args.work / 'cache' / f'{name}-seed{seed}'}",   # one per run: runs may be concurrent
            "checkpoint.interval=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
            f"logging.run_dir={run_dir}", f"logging.interval={args.log_interval}", "logging.tensorboard=false",
            "logging.wandb=false"]


def start_run(name: str, seed: int, args) -> dict:
    """One `transxssm train` in a fresh process, started; finish_run reads it back."""
    run_dir = args.out / "runs" / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = train_command(name, seed, args, run_dir)
    log = open(run_dir / "train.log", "w")
    log.write(" ".join(cmd) + "\n\n")
    log.flush()
    # own session: on a timeout or Ctrl-C the whole group (the trainer and its compile workers) is killed
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": name, "seed": seed, "run_dir": run_dir, "cmd": cmd, "log": log, "proc": proc,
            "started": time.monotonic()}


def run_all(todo: list[tuple[str, int]], args, on_done) -> None:
    """The runs, --parallel at a time (on one GPU too: a d = 256 run uses a few GiB and a fraction of the GPU);
    on_done(record) as each ends. A run past its time limit + KILL_MARGIN_S is killed."""
    timeout = args.time_limit_per_run + KILL_MARGIN_S if args.time_limit_per_run else None
    pending, running = list(todo), []
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                running.append(start_run(*pending.pop(0), args))
            time.sleep(0.2)
            for run in list(running):
                rc = run["proc"].poll()
                if rc is None and timeout and time.monotonic() - run["started"] > timeout:
                    os.killpg(run["proc"].pid, signal.SIGKILL)
                    run["proc"].wait()
                    rc = "timeout"
                if rc is not None:
                    running.remove(run)
                    run["log"].close()
                    on_done(finish_run(run, rc, args))
    except BaseException:  # Ctrl-C reaches only this process: the trainers must not go on holding the GPU
        for run in running:
            os.killpg(run["proc"].pid, signal.SIGKILL)
        raise


def finish_run(run: dict, rc, args) -> dict:
    """The record of an ended run: status, speed and the validation curve, from its log and metrics.jsonl."""
    name, seed, run_dir, cmd, started = (run[k] for k in ("name", "seed", "run_dir", "cmd", "started"))
    wall = time.monotonic() - started
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a time-limited run saves one; nothing reads it
    text = (run_dir / "train.log").read_text(errors="replace")
    records, val = read_metrics(run_dir / "metrics.jsonl")
    steps_done = max((r["step"] for r in records), default=0)
    limited = re.search(r"train\.time_limit_minutes=\S+ reached at step (\d+)", text)
    if rc == "timeout":
        status = "killed"
    elif rc != 0:
        status = "failed"
    elif limited:
        status = "time_limit"
    else:
        status = "finished" if steps_done == args.steps else "incomplete"
    steady = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
    med = lambda k: statistics.median(r[k] for r in steady) if steady and k in steady[0] else None
    params = re.search(r"\[train\] \S+ ([\d.]+)M params", text)
    curve = [{"step": r["step"], "tokens": r["step"] * args.tokens_per_step, "val_loss": r["val_loss"],
              "val_ppl": _ppl(r["val_loss"])} for r in val]
    final = curve[-1] if curve else None
    return {
        "config": name, "seed": seed, "command": " ".join(cmd), "exit_code": rc, "status": status,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1), "parallel": args.parallel, "steps": steps_done,
        "tokens_seen": steps_done * args.tokens_per_step,
        "params_m": float(params.group(1)) if params else None,
        "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "tflops_per_device": med("tflops_per_device"),
        "mem_peak_gib": max((r["mem_peak_gib"] for r in records if "mem_peak_gib" in r), default=None),
        "final_val_step": final["step"] if final else None,
        "final_val_loss": final["val_loss"] if final else None,
        "final_val_ppl": final["val_ppl"] if final else None,
        "val_curve": curve,
        "train_curve": [{"step": r["step"], "loss": r["loss"]} for r in records],
        "error": None if rc == 0 else text[-2000:],
    }


def _ppl(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def plan(configs: list[str], seeds: list[int], extra: list[str]) -> list[tuple[str, int]]:
    """The first seed for every configuration (RUN_ORDER), then each further seed for the `extra` ones."""
    ordered = [c for c in RUN_ORDER if c in configs]
    return [(c, seeds[0]) for c in ordered] + [(c, s) for s in seeds[1:] for c in ordered if c in extra]


# ---------------------------------------------------------------------------------------------------- report
def common_step(runs: list[dict]) -> int | None:
    """The last validation step every run reached: where runs cut short compare with the others on equal terms
    (the same tokens, and the same learning rate so far, as the schedule depends only on the step)."""
    reached = [{p["step"] for p in r["val_curve"] if p["val_ppl"] is not None} for r in runs]
    shared = set.intersection(*reached) if reached else set()
    return max(shared) if shared else None


def summarize(runs: list[dict]) -> list[dict]:
    """Per configuration (paper order): mean, spread and per-seed final validation perplexity, and the mean
    perplexity at common_step(runs)."""
    out = []
    step = common_step(runs)
    for name, (architecture, positional, paper) in CONFIGS.items():
        mine = sorted((r for r in runs if r["config"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        ppl = [r["final_val_ppl"] for r in mine if r["final_val_ppl"] is not None]
        speeds = [r["tokens_per_s"] for r in mine if r["tokens_per_s"]]
        at_step = [p["val_ppl"] for r in mine for p in r["val_curve"] if p["step"] == step]
        out.append({
            "config": name, "architecture": architecture, "ss_positional": positional, "paper_ppl": paper,
            "seeds": [r["seed"] for r in mine], "final_val_ppl": [r["final_val_ppl"] for r in mine],
            "all_finished": all(r["status"] == "finished" for r in mine),
            "mean_ppl": statistics.mean(ppl) if ppl else None,
            "std_ppl": statistics.stdev(ppl) if len(ppl) > 1 else None,
            "min_ppl": min(ppl) if ppl else None, "max_ppl": max(ppl) if ppl else None,
            "mean_val_loss": statistics.mean(math.log(p) for p in ppl) if ppl else None,
            "tokens_per_s": statistics.mean(speeds) if speeds else None,
            "tokens_seen": max(r["tokens_seen"] for r in mine),
            "common_step": step, "mean_ppl_at_common_step": statistics.mean(at_step) if at_step else None,
        })
    return out


def table(summary: list[dict]) -> str:
    fmt = lambda x, f: f.format(x) if x is not None else "-"
    step = summary[0]["common_step"] if summary else None
    lines = [f"{'config':<17}{'paper':>7}{'ours':>11}{'± std':>9}{'seeds':>7}{'val loss':>10}{'tokens':>9}"
             f"{'tok/s':>12}{f'at step {step}':>15}  note"]
    for s in summary:
        note = "" if s["all_finished"] else "not every run finished its schedule (see status)"
        lines.append(f"{s['config']:<17}{s['paper_ppl']:>7.2f}{fmt(s['mean_ppl'], '{:.3f}'):>11}"
                     f"{fmt(s['std_ppl'], '{:.3f}'):>9}{len(s['seeds']):>7}{fmt(s['mean_val_loss'], '{:.4f}'):>10}"
                     f"{s['tokens_seen'] / 1e6:>8.1f}M{fmt(s['tokens_per_s'], '{:,.0f}'):>12}"
                     f"{fmt(s['mean_ppl_at_common_step'], '{:.3f}'):>15}  {note}")
    order = lambda key: " < ".join(s["config"] for s in sorted((s for s in summary if s[key] is not None),
                                                                 key=lambda s: s[key]))
    if len(summary) > 1:
        lines += [f"order, ours (final):        {order('mean_ppl')}",
                  f"order, ours (at step {step}): {order('mean_ppl_at_common_step')}",
                  f"order, paper:               {order('paper_ppl')}"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, final) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(CONFIGS)}
    styles = {"conv1d_d": "--", "none": ":", "rope": "-", None: "-."}
    for s in result["summary"]:
        name = s["config"]
        runs = [r for r in result["runs"] if r["config"] == name and r["val_curve"]]
        for r in runs:
            curves.plot([p["tokens"] / 1e6 for p in r["val_curve"]], [p["val_ppl"] for p in r["val_curve"]],
                        color=colors[name], linewidth=0.7, alpha=0.5, linestyle=styles[s["ss_positional"]])
        by_step: dict[int, list[float]] = {}
        for r in runs:
            for p in r["val_curve"]:
                if p["val_ppl"] is not None:
                    by_step.setdefault(p["tokens"], []).append(p["val_ppl"])
        xs = sorted(by_step)
        curves.plot([x / 1e6 for x in xs], [statistics.mean(by_step[x]) for x in xs], color=colors[name],
                    linewidth=2, linestyle=styles[s["ss_positional"]],
                    label=f"{name} ({len(runs)} seed{'s' if len(runs) != 1 else ''})")
        # the right panel compares at the step every run reached, so a run cut short is not ranked on fewer tokens
        ppl = [p["val_ppl"] for r in runs for p in r["val_curve"] if p["step"] == s["common_step"]]
        final.scatter([s["paper_ppl"]] * len(ppl), ppl, color=colors[name], s=18, alpha=0.6)
        if s["mean_ppl_at_common_step"] is not None:
            final.scatter([s["paper_ppl"]], [s["mean_ppl_at_common_step"]], color=colors[name], marker="D", s=50)
            final.annotate(name, (s["paper_ppl"], s["mean_ppl_at_common_step"]), textcoords="offset points",
                           xytext=(6, 4), fontsize=8, color=colors[name])
    curves.set_yscale("log")
    curves.set_xlabel("tokens seen (M)")
    curves.set_ylabel("validation perplexity")
    curves.grid(True, which="both", alpha=0.3)
    curves.legend(fontsize=8)
    st = result["settings"]
    curves.set_title(f"d={st['hidden']}, {st['layers']} layers, l={st['seq_length']}, {st['steps']} steps x "
                     f"{st['global_batch']} sequences", fontsize=10)
    final.set_xlabel("paper's perplexity (Table 2)")
    step = result["summary"][0]["common_step"] if result["summary"] else None
    final.set_ylabel(f"ours: validation perplexity at step {step}")
    final.set_title(f"at step {step}, which every run reached: seeds (dots), mean (diamond)", fontsize=10)
    final.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with train.bin/.idx, or a prefix (needed unless --report)")
    p.add_argument("--valid", type=Path, help="folder with valid.bin/.idx, or a prefix (default: the --data folder)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/ablation.json, OUT/ablation.png, OUT/runs/")
    p.add_argument("--report", action="store_true", help="run nothing: recompute the summary, table and plot of "
                   "OUT/ablation.json (e.g. a copy brought back from the GPU machine)")
    p.add_argument("--work", type=Path, help="for the dataset index cache (default OUT/data)")
    p.add_argument("--configs", default="all", help=f"all, or comma-separated from: {', '.join(CONFIGS)}")
    p.add_argument("--seeds", default="0", help="comma-separated; the first for every config, the others for "
                   "--extra-seed-configs")
    p.add_argument("--extra-seed-configs", default=EXTRA_SEED_CONFIGS, help="configs run with the seeds after the "
                   "first (all: every config)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--state-size", type=int, default=128, help="SSM state size N")
    p.add_argument("--ffn", type=int, default=None, help="SwiGLU inner size (default 3 x hidden)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=None, help="validate every N steps (default steps / 10)")
    p.add_argument("--eval-iters", type=int, default=8, help="validation global batches per evaluation")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--log-interval", type=int, default=None, help="train log line every N steps (default steps / 20)")
    p.add_argument("--time-limit-per-run", type=float, default=150, help="seconds of training loop per run "
                   "(train.time_limit_minutes), compilation included; 0: none")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, on the same device (tokens/s then "
                   "shares it; perplexities do not depend on it)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--rerun", action="store_true", help="run again the runs OUT/ablation.json already holds")
    args = p.parse_args(argv)
    if args.data is None and not args.report:
        p.error("--data is needed to run (or give --report to summarise OUT/ablation.json)")
    args.out = args.out.resolve()
    args.work = (args.work or args.out / "data").resolve()
    configs = list(CONFIGS) if args.configs == "all" else [c for c in args.configs.split(",") if c]
    extra = list(CONFIGS) if args.extra_seed_configs == "all" else [c for c in args.extra_seed_configs.split(",") if c]
    unknown = [c for c in configs + extra if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2")
    if not configs or not seeds:
        p.error("--configs and --seeds must name at least one config and one seed")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds {args.seeds}: a seed is repeated")
    for name in ("steps", "seq_length", "layers", "hidden", "heads", "micro_batch", "global_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    args.configs, args.seed_list, args.extra = configs, seeds, extra
    args.eval_interval = args.eval_interval or max(1, args.steps // 10)
    args.log_interval = args.log_interval or max(1, args.steps // 20)
    args.tokens_per_step = args.global_batch * args.seq_length
    return args


def settings(args, sources: dict) -> dict:
    """What makes two runs comparable: everything but the choice of configs and seeds and the time limit."""
    return {"steps": args.steps, "seq_length": args.seq_length, "layers": args.layers, "hidden": args.hidden,
            "heads": args.heads, "state_size": args.state_size, "ffn": args.ffn or 3 * args.hidden,
            "micro_batch": args.micro_batch, "global_batch": args.global_batch, "eval_interval": args.eval_interval,
            "eval_iters": args.eval_iters, "lr": args.lr, "device": args.device, "data": sources}


def save(result: dict, out: Path) -> None:
    """The summary recomputed from the runs, OUT/ablation.json and (with any run) OUT/ablation.png rewritten."""
    result["summary"] = summarize(result["runs"])
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    if result["runs"]:
        plot(result, out / "ablation.png")


def report(out: Path) -> int:
    """--report: the summary, table and plot of an existing OUT/ablation.json, nothing run."""
    path = out / "ablation.json"
    if not path.is_file():
        print(f"error: --report: no {path}; run the ablation first, or give the folder that holds it", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    result["report"] = {"commit": commit(), "command": "python3 " + " ".join(sys.argv)}
    save(result, out)
    print(table(result["summary"]))
    print(f"\n[ablation] {path}, {out / 'ablation.png'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.out)
    try:
        args.train_prefix = resolve_prefix(args.data, "train", "--data")
        args.valid_prefix = resolve_prefix(args.valid or (args.data if args.data.is_dir() else args.data.parent),
                                           "valid", "--valid")
        args.out.mkdir(parents=True, exist_ok=True)
        sources = data_sources(args.train_prefix, args.valid_prefix)
        cfgs = {name: ModelConfig.from_dict(model_values(name, args)) for name in CONFIGS}
    except (AblationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = args.out / "ablation.json"
    result = {"benchmark": "ablation", **environment("triton", "megatron.core"), "settings": settings(args, sources),
              "invocations": [],
              "configs": {}, "runs": [], "summary": []}
    if path.is_file():
        previous = json.loads(path.read_text())
        before, now = previous.get("settings", {}), result["settings"]
        differ = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if differ:
            print(f"error: {path} holds runs made with other settings ("
                  f"{', '.join(f'{k}: {before.get(k)} there, {now.get(k)} now' for k in differ)}); give another "
                  "--out, or the same settings to add runs to it", file=sys.stderr)
            return 2
        result["invocations"] = previous.get("invocations", [])
        result["configs"] = previous.get("configs", {})
        result["runs"] = previous.get("runs", [])
    result["invocations"].append({k: result[k] for k in ("date", "commit", "gpu", "python", "torch", "triton",
                                                         "megatron_core", "cuda", "command")})
    for name, cfg in cfgs.items():
        architecture, positional, paper = CONFIGS[name]
        result["configs"][name] = {"architecture": architecture, "ss_positional": positional, "paper_ppl": paper,
                                   "model": model_values(name, args), "layer_kinds": cfg.layer_kinds(),
                                   "train_flops_per_token": train_flops_per_token(cfg, args.seq_length)}

    done = {(r["config"], r["seed"]) for r in result["runs"] if r["status"] == "finished"}
    todo = [(c, s) for c, s in plan(args.configs, args.seed_list, args.extra) if args.rerun or (c, s) not in done]
    skipped = len(plan(args.configs, args.seed_list, args.extra)) - len(todo)
    print(f"[ablation] {len(todo)} runs ({skipped} already in {path}): "
          f"{', '.join(f'{c}/seed{s}' for c, s in todo)}; {args.steps} steps x {args.global_batch} x "
          f"{args.seq_length} = {args.steps * args.tokens_per_step / 1e6:.1f}M tokens each; "
          f"train on {args.train_prefix}, validate on {args.valid_prefix}", flush=True)
    started, finished = time.monotonic(), 0

    def record(run: dict) -> None:   # after every run: a run cut short keeps what it finished
        nonlocal finished
        finished += 1
        key = (run["config"], run["seed"])
        result["runs"] = [r for r in result["runs"] if (r["config"], r["seed"]) != key] + [run]
        save(result, args.out)
        elapsed = time.monotonic() - started
        ppl = run["final_val_ppl"]
        print(f"[ablation] {run['config']} seed {run['seed']}: {run['status']} (exit {run['exit_code']}) in "
              f"{run['wall_s']:.0f} s, step {run['steps']}, val ppl {f'{ppl:.3f}' if ppl is not None else '-'} at "
              f"step {run['final_val_step']}, {run['tokens_per_s'] or 0:,.0f} tok/s | {elapsed:.0f} s so far, "
              f"~{elapsed / finished * (len(todo) - finished):.0f} s to go", flush=True)

    run_all(todo, args, record)
    save(result, args.out)
    print("\n" + table(result["summary"]))
    print(f"\n[ablation] {path}, {args.out / 'ablation.png'}")
    failed = [r for r in result["runs"] if r["exit_code"] != 0]
    for r in failed:
        print(f"[ablation] {r['config']} seed {r['seed']} failed (exit {r['exit_code']}); its log: "
              f"{args.out / 'runs' / (r['config'] + '-seed' + str(r['seed'])) / 'train.log'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
