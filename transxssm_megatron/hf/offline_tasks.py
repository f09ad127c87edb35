"""lm-eval task YAMLs that read the offline asset bundle (.assets/eval) instead of the Hugging Face hub.

Each YAML `include`s lm-eval's own task file by absolute path (so prompts, metrics and `!function` helpers are
lm-eval's, resolved next to the original) and overrides only where the data comes from: the `arrow` builder of
`datasets` over the bundle's arrow files (`dataset_kwargs.data_files`), plus a task name of its own
(`offline_<task>`) so it never shadows the online task. MMLU becomes a group `offline_mmlu` of 57 subject tasks
(test split, few-shot examples from dev), aggregated weighted by size like lm-eval's `mmlu`.

    names = write_offline_tasks(Path(".assets/eval"), Path("/tmp/tasks"), ["arc_easy", "mmlu"])
    # {"arc_easy": "offline_arc_easy", "mmlu": "offline_mmlu"}; pass include_path="/tmp/tasks" to lm-eval

Data differences from the online tasks: TriviaQA is `rc.wikipedia.nocontext` validation (7,993 questions) where
lm-eval's online task uses `rc.nocontext` (17,944); the others are the same validation splits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import yaml

# Our (paper) task name -> (lm-eval task file relative to lm_eval/tasks, asset folder, splits the task reads).
TASK_FILES = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", ("validation",)),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", ("validation",)),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", ("validation",)),
    "piqa": ("piqa/piqa.yaml", "piqa", ("validation",)),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", ("validation",)),
    "winogrande": ("winogrande/default.yaml", "winogrande", ("validation",)),
    "triviaqa": ("triviaqa/default.yaml", "triviaqa", ("validation",)),
}
MMLU_TEMPLATE = "mmlu/default/mmlu_{subject}.yaml"


class OfflineTaskError(ValueError):
    """The asset bundle lacks a task or split; the message names the folder and the command that builds it."""


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _arrow(assets: Path, folder: str, split: str) -> str:
    files = sorted((assets / folder / split).glob("*.arrow"))
    if not files:
        raise OfflineTaskError(f"{assets / folder / split}: no .arrow file; build the bundle with "
                               f"`transxssm-preprocess assets --out .assets` or pass --offline-assets DIR")
    if len(files) > 1:
        return [str(f) for f in files]  # type: ignore[return-value]
    return str(files[0])


def _task_yaml(include: Path, name: str, data_files: dict, test_split: str | None, fewshot_split: str | None
               ) -> dict:
    entry = {"include": str(include), "task": name, "tag": ["transxssm_offline"], "dataset_path": "arrow",
             "dataset_name": None, "dataset_kwargs": {"data_files": data_files}, "training_split": None,
             "validation_split": "validation" if "validation" in data_files else None, "test_split": test_split}
    if fewshot_split:
        entry["fewshot_split"] = fewshot_split
    return entry


def mmlu_subjects(assets: Path) -> list[str]:
    root = assets / "mmlu"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir()) if root.is_dir() else []
    if not subjects:
        raise OfflineTaskError(f"{root}: no MMLU subjects; build the bundle with `transxssm-preprocess assets --out "
                               f".assets` or pass --offline-assets DIR")
    return subjects


def write_offline_tasks(assets: str | Path, out_dir: str | Path, tasks: Iterable[str]) -> dict[str, str]:
    """Write the YAMLs of `tasks` (paper names: arc_easy ... mmlu, triviaqa) into `out_dir`; return paper name ->
    lm-eval task (or group) name."""
    assets, out_dir = Path(assets), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_tasks = _lm_eval_tasks_dir()
    names = {}
    for task in tasks:
        if task == "mmlu":
            subtasks = []
            for subject in mmlu_subjects(assets):
                name = f"offline_mmlu_{subject}"
                files = {split: _arrow(assets, f"mmlu/{subject}", split) for split in ("test", "dev")}
                entry = _task_yaml(lm_tasks / MMLU_TEMPLATE.format(subject=subject), name, files, "test", "dev")
                (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
                subtasks.append(name)
            group = {"group": "offline_mmlu", "task": subtasks,
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
            (out_dir / "offline_mmlu.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
            names[task] = "offline_mmlu"
            continue
        if task not in TASK_FILES:
            raise OfflineTaskError(f"--tasks {task}: no offline version; choose from "
                                   f"{', '.join([*TASK_FILES, 'mmlu'])}")
        relative, folder, splits = TASK_FILES[task]
        files = {split: _arrow(assets, folder, split) for split in splits}
        entry = _task_yaml(lm_tasks / relative, f"offline_{task}", files, None, None)
        (out_dir / f"offline_{task}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
        names[task] = f"offline_{task}"
    (out_dir / "INDEX.json").write_text(json.dumps({"assets": str(assets.resolve()), "tasks": names}, indent=1))
    return names
