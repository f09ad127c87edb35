"""Taking back the run dir of a `transxssm train` that failed before it trained."""

from __future__ import annotations

import shutil
from pathlib import Path

from transxssm_megatron.training.metrics import read_metrics


class NewRunDir:
    """Takes back the run dir of a `train` that failed before it trained: a new user's typo must not leave an
    empty runs/x behind, which the next (fixed) command would then resume from or trip over.

    Only what the start of a run writes is removed (config.yaml, an empty metrics.jsonl, tensorboard/ and
    data_cache/ beside it, an empty checkpoints/), and only when the folder did not exist or was empty before; a
    metrics record, a checkpoint or any other file keeps the folder as it is. Folders above it that the run
    created go too, when empty. Global rank 0 only (the rank that writes config.yaml)."""

    STARTUP_FILES = {"config.yaml", "metrics.jsonl", "tensorboard", "data_cache", "checkpoints", "wandb_run_id"}

    def __init__(self, run_dir, owner: bool):
        self.run_dir = Path(run_dir)
        self.owner = owner
        self.existed = self.run_dir.is_dir()
        self.was_empty = not self.existed or not any(self.run_dir.iterdir())
        self.created = [d for d in [self.run_dir, *self.run_dir.parents] if not d.exists()]

    def _unused(self) -> bool:
        entries = {p.name: p for p in self.run_dir.iterdir()}
        if not set(entries) <= self.STARTUP_FILES:
            return False
        if "checkpoints" in entries and (not entries["checkpoints"].is_dir() or any(entries["checkpoints"].iterdir())):
            return False
        train_records, val_records = read_metrics(self.run_dir / "metrics.jsonl")
        return not train_records and not val_records

    def remove_if_unused(self) -> None:
        if not (self.owner and self.was_empty and self.run_dir.is_dir() and self._unused()):
            return
        try:
            if self.existed:
                for entry in list(self.run_dir.iterdir()):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                return
            shutil.rmtree(self.run_dir)
            for folder in self.created[1:]:  # nearest first; stops at the first one that is not empty
                folder.rmdir()
        except OSError:
            pass  # a clean-up that cannot finish must not hide the error that made the run fail
