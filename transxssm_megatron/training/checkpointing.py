"""Checkpoints: megatron-core `dist_checkpointing`, written atomically, reshardable, with exact-resume state.

Layout of `save_dir`:

    iter_0000100/            a complete checkpoint: torch_dist shards + metadata + the COMPLETE marker
    iter_0000200.tmp/        being written, or left behind by a killed save: never loaded, removed by the next save

A save writes everything into `iter_XXXXXXX.tmp`, waits for every rank (barrier), then rank 0 writes the
COMPLETE marker and renames the folder to its final name. A rename is atomic on POSIX file systems, so a save
killed at any point leaves the previous checkpoint as `latest()`.

What a checkpoint holds (one sharded state dict):
- `model` (or `model0`, `model1`, ... with virtual pipeline stages): each chunk's `sharded_state_dict()`. Tensor
  keys are global (layer numbers include the pipeline offset), so a checkpoint saved at one TP/PP/DP loads at
  another: dist_checkpointing reads exactly the slice each rank needs.
- `optimizer`: `optimizer.sharded_state_dict(model_state)`. Per-parameter state (Adam moments, fp32 main
  params) is keyed by the same global parameter keys, so it reshards like the model. The optimizer's
  `param_groups` are rank-local bookkeeping (which local parameter ids are in which group); they differ between
  pipeline stages and layouts, so they are not saved: on load the current optimizer's groups are used and the
  learning rate / weight decay are restored by the scheduler.
- `scheduler`: `OptimizerParamScheduler.state_dict()`.
- `train_state`: the loop's own dict (step, consumed samples, ...), identical on every rank.
- `rng_state`: one entry per global rank (python, numpy, torch, cuda, megatron's RNG tracker). Restored only
  when the parallel layout is unchanged; after a change of TP/PP/DP the per-rank streams have no meaning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
_FINAL_NAME = re.compile(r"^iter_(\d{7,})$")
_STALE_SUFFIXES = (".tmp", ".trash")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Small distributed helpers (work without an initialised process group, e.g. for tools that inspect a run dir)

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else 1


def _barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (best effort: not every file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# RNG state

def capture_rng_state() -> dict:
    """Every random stream this rank uses: python, numpy, torch CPU, CUDA (when used), megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# ----------------------------------------------------------------------------------------------------------------
# Parallel layout

def current_layout() -> dict:
    """The parallel layout of this process group: sizes only (identical on every rank)."""
    from megatron.core import parallel_state as ps

    if not (_dist_ready() and ps.model_parallel_is_initialized()):
        return {"tp": 1, "pp": 1, "dp": 1, "world_size": _world_size()}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "world_size": _world_size(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Building the sharded state dict

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Peel DDP / Float16Module wrappers: only the bare model knows its sharded_state_dict()."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _model_key(index: int, n_chunks: int) -> str:
    return "model" if n_chunks == 1 else f"model{index}"


def _model_sharded_state_dict(model_chunks: list) -> dict:
    n = len(model_chunks)
    return {_model_key(i, n): _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _optimizer_dicts(tree: Any):
    """Yield every torch-optimizer-style dict (has 'state' and 'param_groups') inside a (chained) state dict."""
    if isinstance(tree, dict):
        if "state" in tree and "param_groups" in tree:
            yield tree
        else:
            for value in tree.values():
                yield from _optimizer_dicts(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _optimizer_dicts(value)


def _prepare_distributed_optimizer(opt) -> None:
    """Work around two gaps of megatron-core 0.19.2's DistributedOptimizer with torch's AdamW (no TE/apex), both
    seen on an H200:
    - sharded_state_dict reads the step count from the inner optimizer's state and asserts there is exactly one,
      so with no state yet (a fresh run loading a checkpoint, or a save before the first step) it fails. We give
      it the state a first AdamW step would allocate (zero moments, step 0); a load overwrites it in place.
    - loading parameter state copies every tensor of the inner state, `step` included, from the checkpoint's
      per-parameter tensors, which never hold `step` (it travels in param_groups): KeyError 'step'. We let that
      copy skip `step` (megatron's own load sets it from param_groups)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(opt, "optimizer", None)
    if not isinstance(opt, DistributedOptimizer) or inner is None:
        return
    if len(inner.state) == 0:
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    if not getattr(opt, "_transxssm_step_tolerant", False):
        set_states = opt._set_main_param_and_optimizer_states
        # a non-tensor value is skipped by megatron's copy loop
        opt._set_main_param_and_optimizer_states = lambda param, tensors: set_states(param, {"step": None, **tensors})
        opt._transxssm_step_tolerant = True


def _optimizer_sharded_state_dict(optimizer, model_state: dict, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    # The distributed optimizer (GPU) can write several formats; `fully_reshardable` gathers each parameter's
    # state into model space under the parameter's global key, so it reloads at any TP/PP/DP. (megatron-core
    # 0.19.2's default, `fully_sharded_model_space`, builds flattened-range shards that its own
    # dist_checkpointing then rejects: "ShardedTensor.flattened_range is not supported", seen on an H200.)
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        _prepare_distributed_optimizer(opt)
    state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    # param_groups hold rank-local parameter ids: keep them out of the checkpoint (see the module docstring).
    # A LocalNonpersistentObject is dropped on save and, on load, stands for "use the current value".
    for opt_dict in _optimizer_dicts(state):
        opt_dict["param_groups"] = LocalNonpersistentObject(opt_dict["param_groups"])
    return state


def _rng_sharded_object(rng: dict | None):
    from megatron.core.dist_checkpointing import ShardedObject

    rank, world = _rank(), _world_size()
    return ShardedObject("rng_state", rng, global_shape=(world,), global_offset=(rank,), replica_id=0)


def _fit_optimizer_state(loaded: Any, current_ids: list[set]) -> None:
    """Make a loaded optimizer state dict this rank's: its own param_groups (the LocalNonpersistentObject put in
    by `_optimizer_sharded_state_dict`), and state entries only for its own parameters. A checkpoint's common
    part comes from rank 0 of the saving run, whose optimizer may have listed other parameter ids (another
    pipeline stage, another layout)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    for opt_dict, ids in zip(_optimizer_dicts(loaded), current_ids):
        if isinstance(opt_dict["param_groups"], LocalNonpersistentObject):
            opt_dict["param_groups"] = opt_dict["param_groups"].unwrap()
        for group in opt_dict["param_groups"]:  # megatron wraps each group's ids the same way
            if isinstance(group["params"], LocalNonpersistentObject):
                group["params"] = group["params"].unwrap()
        for key in list(opt_dict["state"]):
            if key not in ids and key != "common_step":
                del opt_dict["state"][key]


# ----------------------------------------------------------------------------------------------------------------
# The manager

class CheckpointManager:
    """Save / find / load checkpoints under `save_dir`, keeping the newest `keep_last` (None or 0: keep all).

    Every method except `latest()` and `list_complete()` is collective: call it on every rank.
    """

    def __init__(self, save_dir: str | os.PathLike, keep_last: int | None = None):
        self.save_dir = Path(save_dir)
        if keep_last is not None and keep_last < 0:
            raise CheckpointError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        self.keep_last = keep_last or None

    # -- finding ---------------------------------------------------------------------------------------------
    def path_for(self, step: int) -> Path:
        return self.save_dir / f"iter_{step:07d}"

    def list_complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. Folders without the marker or with a .tmp name are skipped."""
        if not self.save_dir.is_dir():
            return []
        found = []
        for child in self.save_dir.iterdir():
            match = _FINAL_NAME.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (then training starts from scratch)."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        match = _FINAL_NAME.match(Path(path).name)
        if not match:
            raise CheckpointError(f"{path}: not a checkpoint folder name (expected iter_XXXXXXX)")
        return int(match.group(1))

    def clean_incomplete(self) -> list[Path]:
        """Remove folders left by killed saves (rank 0 only; call while no save is running). Returns them."""
        removed = []
        if _rank() != 0 or not self.save_dir.is_dir():
            return removed
        for child in self.save_dir.iterdir():
            if child.is_dir() and child.name.startswith("iter_") and child.name.endswith(_STALE_SUFFIXES):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        for child in removed:
            logger.warning("removed incomplete checkpoint folder %s (left by an interrupted save)", child)
        return removed

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, step: int, model_chunks: list, optimizer, scheduler, train_state: dict) -> Path:
        """Write checkpoint `iter_{step}` atomically; returns its final path. Collective."""
        from megatron.core import dist_checkpointing

        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        started = time.monotonic()
        if _rank() == 0:
            self.clean_incomplete()
            tmp.mkdir(parents=True)
        _barrier()

        model_state = _model_sharded_state_dict(model_chunks)
        state = dict(model_state)
        if optimizer is not None:
            state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_state, is_loading=False)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["train_state"] = dict(train_state)
        state["layout"] = current_layout()
        state["format_version"] = FORMAT_VERSION
        state["rng_state"] = _rng_sharded_object(capture_rng_state())

        dist_checkpointing.save(state, str(tmp), sharded_strategy=self._save_strategy())
        _barrier()  # every rank's shards are on disk before the checkpoint is declared complete

        if _rank() == 0:
            marker = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "layout": state["layout"], "format_version": FORMAT_VERSION}
            with open(tmp / COMPLETE_MARKER, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # same step saved again (e.g. preempted right after a resume): replace it
                trash = final.with_name(final.name + ".trash")
                final.rename(trash)
                tmp.rename(final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(self.save_dir)
            self._apply_retention()
            logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        _barrier()  # nobody proceeds (or exits) before the checkpoint is visible under its final name
        return final

    def _apply_retention(self) -> None:
        if not self.keep_last:
            return
        for old in self.list_complete()[: -self.keep_last]:
            # Rename first, so a kill during rmtree leaves a .trash folder, never a half-deleted "complete" one.
            trash = old.with_name(old.name + ".trash")
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _save_strategy():
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        strategy = TorchDistSaveShardedStrategy()
        if _dist_ready() and ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
            # Data-parallel replicas hold identical shards; spread the writing over them instead of DP rank 0.
            dp_group = ps.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, dp_group)
        return strategy

    # -- loading ---------------------------------------------------------------------------------------------
    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict:
        """The COMPLETE marker of a checkpoint (step, layout, time); raises CheckpointError if it is missing."""
        path = Path(path)
        marker = path / COMPLETE_MARKER
        if not marker.is_file():
            raise CheckpointError(f"{path}: no {COMPLETE_MARKER} marker, so this checkpoint was never finished "
                                  f"(a killed save). Load an older one, or start without --resume.")
        with open(marker) as f:
            return json.load(f)

    def load(self, path: str | os.PathLike, model_chunks: list, optimizer=None, scheduler=None, *,
             load_optimizer: bool = True, load_rng: bool = True) -> dict:
        """Load checkpoint `path` into the model chunks (+ optimizer, scheduler, RNG); return its train_state.

        Works at a different TP/PP/DP than the one that saved it. `load_optimizer=False` loads the model
        weights only (fresh optimizer moments and schedule: fine-tuning, or a checkpoint whose optimizer state
        does not fit). RNG states are restored only when the layout is unchanged. Collective.
        """
        from megatron.core import dist_checkpointing

        path = Path(path)
        saved = self.read_metadata(path)
        saved_layout, layout = saved["layout"], current_layout()
        same_layout = saved_layout == layout
        with_optimizer = load_optimizer and optimizer is not None

        model_state = _model_sharded_state_dict(model_chunks)
        request = dict(model_state)
        current_ids = []
        if with_optimizer:
            request["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_state, is_loading=True)
            current_ids = [set(d["state"]) for d in _optimizer_dicts(request["optimizer"])]
        restore_rng = load_rng and same_layout
        if restore_rng:
            request["rng_state"] = _rng_sharded_object(None)

        try:
            loaded = dist_checkpointing.load(request, str(path))
        except Exception as err:  # dist_checkpointing's errors do not say which run or what to do
            hint = (" If only the optimizer state fails to load (e.g. another optimizer type), "
                    "CheckpointManager.load(..., load_optimizer=False) starts from the saved weights with a fresh "
                    "optimizer and schedule.") if with_optimizer else ""
            raise CheckpointError(f"{path}: loading failed at layout {layout} (saved at {saved_layout}): "
                                  f"{type(err).__name__}: {err}.{hint}") from err

        n = len(model_chunks)
        for i, chunk in enumerate(model_chunks):
            _unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
        if with_optimizer:
            _fit_optimizer_state(loaded["optimizer"], current_ids)
            optimizer.load_state_dict(loaded["optimizer"])
            if scheduler is not None and loaded.get("scheduler") is not None:
                scheduler.load_state_dict(loaded["scheduler"])
        if restore_rng:
            restore_rng_state(loaded["rng_state"])
        elif load_rng and _rank() == 0:
            logger.warning("%s was saved at layout %s, now %s: RNG states not restored (per-rank streams do not "
                           "carry over to a different layout); training continues but not bit-identically.",
                           path, saved_layout, layout)
        _barrier()
        return dict(loaded.get("train_state") or {})

    def load_latest(self, model_chunks: list, optimizer=None, scheduler=None, **kwargs) -> dict | None:
        """`--resume auto`: load `latest()` if there is one and return its train_state; None when none exists."""
        path = self.latest()
        if _dist_ready():  # every rank must load the same one, even if a file system shows them different views
            choice = [path]
            torch.distributed.broadcast_object_list(choice, src=0)
            path = choice[0]
        if path is None:
            return None
        return self.load(path, model_chunks, optimizer, scheduler, **kwargs)
