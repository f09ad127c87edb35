"""`transxssm eval`: lm-eval (`hf` model) on the paper's tasks, reported in the layout of its Table 3.

    transxssm eval --model exports/x                                   # online task names (Hugging Face hub)
    transxssm eval --model exports/x --offline-assets .assets/eval     # no network: the local asset bundle
    transxssm eval --model exports/x --tasks arc_easy piqa --limit 100 --batch-size 16 --out runs/eval/x

Tasks (paper names): arc_easy, arc_challenge, hellaswag, piqa, openbookqa, winogrande, mmlu, triviaqa. The metric of
each is the one the paper reports: acc_norm where lm-eval computes it (ARC-E, ARC-C, HellaSwag, PIQA, OBQA), acc
(Winogrande, MMLU: lm-eval's size-weighted group mean), exact_match (TriviaQA, generative, greedy). Zero-shot unless
--num-fewshot. Writes OUT/results.json (lm-eval's results plus our summary) and OUT/table.md: our row beside the
paper's rows. The paper (SPEC.md §9) gives only each model's average "over 7 tasks incl. ARC"; we read ARC as the
mean of ARC-E and ARC-C and average it with the other six. Offline runs set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "winogrande", "mmlu", "triviaqa")
# paper task -> (lm-eval metric key, column title)
METRICS = {
    "mmlu": ("acc,none", "MMLU"),
    "triviaqa": ("exact_match,remove_whitespace", "TriviaQA"),
    "piqa": ("acc_norm,none", "PIQA"),
    "hellaswag": ("acc_norm,none", "HellaSwag"),
    "openbookqa": ("acc_norm,none", "OBQA"),
    "winogrande": ("acc,none", "Winogrande"),
    "arc_easy": ("acc_norm,none", "ARC-E"),
    "arc_challenge": ("acc_norm,none", "ARC-C"),
}
# SPEC.md §9: average over 7 tasks, per model and size. Per-task numbers are not in our spec.
PAPER_AVERAGES = {
    "320M": {"TransXSSM": 45.22, "Llama3": 43.99, "Mamba2": 43.07, "Jamba": 44.31},
    "1.3B": {"TransXSSM": 52.44, "Llama3": 50.36, "Mamba2": 49.07, "Jamba": 51.07},
}


class EvalError(ValueError):
    """Bad arguments or missing inputs for `transxssm eval`; one line naming the fix."""


def _set_offline() -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"


def lm_eval_task_names(tasks: Iterable[str], offline_assets: Optional[Path], include_dir: Optional[Path]
                       ) -> dict[str, str]:
    """paper task -> lm-eval task name: the online names, or offline YAMLs written into `include_dir`."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in PAPER_TASKS]
    if unknown:
        raise EvalError(f"--tasks {unknown[0]}: unknown; choose from {', '.join(PAPER_TASKS)}")
    if offline_assets is None:
        return {t: t for t in tasks}
    from transxssm_megatron.hf.offline_tasks import OfflineTaskError, write_offline_tasks

    try:
        return write_offline_tasks(offline_assets, include_dir, tasks)
    except OfflineTaskError as err:
        raise EvalError(str(err)) from None


def summarize(results: dict, names: dict[str, str]) -> dict[str, Optional[float]]:
    """Paper column title -> score in percent (None when the task did not run), plus ARC and Avg (7)."""
    scores: dict[str, Optional[float]] = {}
    for task, (metric, title) in METRICS.items():
        value = results.get(names.get(task, ""), {}).get(metric) if task in names else None
        scores[title] = None if value is None else 100.0 * float(value)
    arc = [scores["ARC-E"], scores["ARC-C"]]
    scores["ARC"] = None if None in arc else sum(arc) / 2
    seven = [scores[t] for t in ("MMLU", "TriviaQA", "PIQA", "HellaSwag", "OBQA", "Winogrande", "ARC")]
    scores["Avg"] = None if None in seven else sum(seven) / 7
    return scores


def table(scores: dict[str, Optional[float]], model_name: str) -> str:
    """Markdown in the layout of the paper's Table 3, our row first, then the paper's (average only)."""
    columns = ["MMLU", "TriviaQA", "PIQA", "HellaSwag", "OBQA", "Winogrande", "ARC-E", "ARC-C", "Avg"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    lines = ["| Model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|",
             f"| {model_name} (ours) | " + " | ".join(fmt(scores.get(c)) for c in columns) + " |"]
    for size, rows in PAPER_AVERAGES.items():
        for name, avg in rows.items():
            lines.append(f"| {name} {size} (paper) | " + " | ".join("–" for _ in columns[:-1]) + f" | {avg:.2f} |")
    lines.append("")
    lines.append("Avg: mean of MMLU, TriviaQA, PIQA, HellaSwag, OBQA, Winogrande and ARC (= mean of ARC-E, ARC-C); "
                 "acc_norm for ARC, HellaSwag, PIQA, OBQA; acc for Winogrande, MMLU; exact match for TriviaQA. "
                 "The paper reports only the average per model.")
    return "\n".join(lines) + "\n"


def evaluate(model_dir: str | Path, *, tasks: Iterable[str] = PAPER_TASKS, offline_assets: Optional[str | Path] = None,
             limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
             max_gen_toks: Optional[int] = None, device: str = "auto", dtype: str = "auto",
             out: Optional[str | Path] = None) -> dict:
    """Run lm-eval on the export `model_dir`; returns {"scores": ..., "results": lm-eval's per-task results}."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"--model {model_dir}: not an export folder (no config.json); make one with `transxssm "
                        f"convert --to hf CHECKPOINT OUT`")
    if offline_assets is not None:
        offline_assets = Path(offline_assets)
        if not offline_assets.is_dir():
            raise EvalError(f"--offline-assets {offline_assets}: no such folder (expected .assets/eval)")
        _set_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from transxssm_megatron.hf.loading import resolve_device

    with tempfile.TemporaryDirectory(prefix="transxssm-tasks-") as include_dir:
        names = lm_eval_task_names(tasks, offline_assets, Path(include_dir))
        manager = (TaskManager(include_path=include_dir, include_defaults=False) if offline_assets is not None
                   else TaskManager())  # offline YAMLs include lm-eval's files by path: no need to index them all
        model_args = {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype,
                      "backend": "causal"}
        output = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(names.values()),
                                         num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                         gen_kwargs=None if max_gen_toks is None else f"max_gen_toks={max_gen_toks}",
                                         device=str(resolve_device(device)), task_manager=manager,
                                         log_samples=False)
    results = output["results"]
    scores = summarize(results, names)
    summary = {"model": str(model_dir), "tasks": names, "scores": scores, "limit": limit, "batch_size": batch_size,
               "num_fewshot": num_fewshot, "max_gen_toks": max_gen_toks, "offline_assets": None if offline_assets is None else str(offline_assets),
               "results": results, "versions": output.get("versions"), "n-samples": output.get("n-samples")}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (out / "table.md").write_text(table(scores, model_dir.name))
    return summary


def run(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / "eval" / Path(args.model).resolve().name
    summary = evaluate(args.model, tasks=args.tasks, offline_assets=args.offline_assets, limit=args.limit,
                       batch_size=args.batch_size, num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks,
                       device=args.device,
                       dtype=args.dtype, out=out)
    print(table(summary["scores"], Path(args.model).name), end="")
    print(f"[eval] results: {out / 'results.json'}, table: {out / 'table.md'}")
    return 0
