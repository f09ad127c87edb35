"""Checkpoints: megatron-core `dist_checkpointing`, written atomically, verified on load, reshardable, with exact-resume
state.

Layout of `save_dir`:

    iter_0000100/            a complete checkpoint: torch_dist shards + metadata + the COMPLETE marker
    iter_0000200.tmp/        being written, or left behind by a killed save: never loaded

A save writes everything into `iter_XXXXXXX.tmp`, waits for every rank (barrier), records the size and checksum of
every file written (the hashing spread over the ranks), then rank 0 writes the COMPLETE marker and renames the
folder to its final name. A rename is atomic on POSIX file systems, so a save killed at any point leaves the
previous checkpoint as `latest()`.

Files of a checkpoint (megatron-core 0.19.2, torch_dist backend): `__<rank>_<n>.distcp` (tensor and object shards),
`.metadata` (where every shard lives, plus the common, non-sharded state: scheduler, train_state, layout),
`metadata.json` (the backend's name) and `COMPLETE`, our marker: JSON with the step, layout, time and
`files: {name: {size, checksum}}` (sha256).

Integrity, stale-folder cleaning and `checkpoint.keep_last` retention are in checkpoint_integrity.py (no torch,
no megatron-core). Loading checks every recorded file's size and checksum first, the hashing spread over the
ranks, so a truncated, overwritten or missing file is reported by name instead of loading garbage.
`--resume auto` takes the newest intact checkpoint and warns about each newer one it skipped; a PATH that fails
the check is refused. After each save rank 0 applies retention (damaged checkpoints do not count towards
`keep_last`; 0 keeps all) and cleans stale folders.

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

torch and megatron-core are imported inside the functions that use them, so importing this module (as
`transxssm checkpoint verify/list` do, for the names re-exported below) costs neither.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from transxssm_megatron.training.checkpoint_integrity import (
    COMPLETE_MARKER,
    FINAL_NAME,
    CheckpointError,
    CheckpointStatus,
    checkpoint_folders,
    choose_another,
    clean_stale_folders,
    delete_folder,
    files_of,
    final_folders,
    hash_files,
    inspect_checkpoint,
    looks_like_checkpoint,
    marked_folders,
    merge_statuses,
    one_line,
    read_marker,
    retire_old,
    share_by_size,
    write_marker,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# The integrity names in here are also imported from this module (by the CLI and by callers of the manager);
# checkpoint_integrity.py is their home.
__all__ = ["COMPLETE_MARKER", "FORMAT_VERSION", "CheckpointError", "CheckpointManager", "CheckpointStatus",
           "capture_rng_state", "checkpoint_folders", "current_layout", "inspect_checkpoint", "read_marker",
           "restore_rng_state"]

# ----------------------------------------------------------------------------------------------------------------
# Small distributed helpers (work without an initialised process group, e.g. for tools that inspect a run dir)

def _dist_ready() -> bool:
    # A process that never imported torch has no process group; looking it up in sys.modules keeps the
    # inspection commands free of the torch import.
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if _dist_ready() else 0


def _world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if _dist_ready() else 1


def _barrier() -> None:
    if _dist_ready():
        import torch

        torch.distributed.barrier()


def _from_rank0(value: Any) -> Any:
    """`value` as rank 0 has it, on every rank (a shared file system may show ranks different views for a moment,
    and every rank must take the same branch before the next collective)."""
    if not _dist_ready():
        return value
    import torch

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not _dist_ready():
        return [value]
    import torch

    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


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
    import numpy as np
    import torch
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
    import numpy as np
    import torch
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
    layout = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "world_size": _world_size(),
    }
    if ps.get_context_parallel_world_size() > 1:  # only then, so that earlier checkpoints' layouts still match
        layout["cp"] = ps.get_context_parallel_world_size()
    return layout


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
    import torch
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
    """Save / find / verify / load checkpoints under `save_dir`, keeping the newest `keep_last` intact ones (None
    or 0: all; damaged checkpoints do not count, see checkpoint_integrity.py).

    Every method except `latest()`, `list_complete()`, `path_for()` and `step_of()` is collective: call it on
    every rank.
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
        """Checkpoints with a COMPLETE marker, oldest first (not verified: see `verify`)."""
        return marked_folders(self.save_dir)

    def latest(self) -> Path | None:
        """The newest checkpoint with a COMPLETE marker, or None. Not verified: `newest_intact()` is."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        match = FINAL_NAME.match(Path(path).name)
        if not match:
            raise CheckpointError(f"{path}: not a checkpoint folder name (expected iter_XXXXXXX)")
        return int(match.group(1))

    def verify(self, path: str | os.PathLike) -> CheckpointStatus:
        """Sizes and checksums of `path` against its marker, the hashing spread over all ranks. Collective; every
        rank gets the same status."""
        path = Path(path)
        rank, world = _rank(), _world_size()
        return merge_statuses(_gathered(inspect_checkpoint(path, share=(rank, world) if world > 1 else None)))

    def newest_intact(self) -> tuple[Path | None, list[CheckpointStatus]]:
        """The newest checkpoint that passes `verify` (or has an old, unverifiable marker) and the status of each
        newer folder skipped on the way. None when there is none; CheckpointError when checkpoints with a marker
        exist but every one of them is damaged (starting from scratch would silently drop the run). Collective."""
        skipped = []
        for path in reversed(_from_rank0(final_folders(self.save_dir) if _rank() == 0 else None)):
            status = self.verify(path)
            if status.loadable:
                return path, skipped
            skipped.append(status)
        damaged = [s for s in skipped if s.state == "bad"]
        if damaged:
            listing = "; ".join(f"{s.path.name}: {s.reason}" for s in damaged[:3])
            raise CheckpointError(f"{self.save_dir}: no intact checkpoint ({listing}). Restore a checkpoint from a "
                                  f"copy, or start fresh with --resume none (see transxssm checkpoint list "
                                  f"{self.save_dir})")
        return None, skipped

    # -- cleaning --------------------------------------------------------------------------------------------
    def clean_stale(self, intact: Optional[Path]) -> list[str]:
        """Remove what interrupted saves left behind (rules in checkpoint_integrity.py). `intact`: a checkpoint known
        to be intact (just verified and loaded), or None (then only `.trash` folders go; so, too, when it lies
        outside this dir). Returns one message per folder removed or deliberately kept. Rank 0 acts, the others
        wait. Collective."""
        older_than = None
        if intact is not None and Path(intact).resolve().parent == self.save_dir.resolve():
            match = FINAL_NAME.match(Path(intact).name)
            older_than = int(match.group(1)) if match else None
        messages = clean_stale_folders(self.save_dir, older_than) if _rank() == 0 else []
        _barrier()
        return messages

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, step: int, model_chunks: list, optimizer, scheduler, train_state: dict) -> Path:
        """Write checkpoint `iter_{step}` atomically; returns its final path. Collective."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        started = time.monotonic()
        if _rank() == 0:
            if tmp.exists():  # this step's own leftover: an earlier attempt at the same save
                delete_folder(tmp)
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

        try:
            dist_checkpointing.save(state, str(tmp), sharded_strategy=self._save_strategy())
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            raise CheckpointError(f"{tmp}: saving failed: {_describe_failure(err)}. Check free space and write "
                                  f"access in {self.save_dir}") from err
        _barrier()  # every rank's shards are on disk before they are hashed and the checkpoint declared complete
        files = self._record_files(tmp)

        if _rank() == 0:
            write_marker(tmp, {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "layout": state["layout"], "format_version": FORMAT_VERSION}, files)
            if final.exists():  # same step saved again (e.g. preempted right after a resume): replace it
                trash = final.with_name(final.name + ".trash")
                final.rename(trash)
                tmp.rename(final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(self.save_dir)
            # The new checkpoint is intact by construction: retention and cleaning may act in its favour.
            for message in retire_old(self.save_dir, self.keep_last, intact=final):
                logger.warning("%s", message)
            for message in clean_stale_folders(self.save_dir, older_than=step):
                if message.startswith("removed"):
                    logger.warning("%s", message)
            logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        _barrier()  # nobody proceeds (or exits) before the checkpoint is visible under its final name
        return final

    @staticmethod
    def _record_files(folder: Path) -> dict[str, dict]:
        """{name: {size, checksum}} of every file in `folder`; each rank hashes a share. Collective."""
        sizes = _from_rank0(files_of(folder) if _rank() == 0 else None)  # one listing, not one per rank
        mine = share_by_size(sizes, _world_size())[_rank()]
        files = {}
        for part in _gathered(hash_files(folder, mine)):
            for name, result in part.items():
                if isinstance(result, OSError):
                    raise CheckpointError(f"{folder / name}: cannot be read back after the save ({result}); check "
                                          f"the file system of {folder.parent}")
                files[name] = {"size": result[0], "checksum": result[1]}
        return dict(sorted(files.items()))

    @staticmethod
    def _save_strategy():
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        strategy = TorchDistSaveShardedStrategy()
        if (_dist_ready() and ps.model_parallel_is_initialized()
                and ps.get_data_parallel_world_size(with_context_parallel=True) > 1):
            # Data- and context-parallel replicas hold identical shards; spread the writing over them instead of
            # DP rank 0.
            dp_group = ps.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, dp_group)
        return strategy

    # -- loading ---------------------------------------------------------------------------------------------
    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict:
        """The COMPLETE marker of a checkpoint (step, layout, time, files); CheckpointError if missing/unreadable."""
        return read_marker(path)

    def load(self, path: str | os.PathLike, model_chunks: list, optimizer=None, scheduler=None, *,
             load_optimizer: bool = True, load_rng: bool = True, verify: bool = True) -> dict:
        """Load checkpoint `path` into the model chunks (+ optimizer, scheduler, RNG); return its train_state.

        First checks every file against the marker (`verify=False` skips that when the caller just did, as
        `newest_intact` does) and refuses a damaged or incomplete checkpoint with a CheckpointError naming the
        file. Works at a different TP/PP/DP than the one that saved it. `load_optimizer=False` loads the model
        weights only (fresh optimizer moments and schedule: fine-tuning, or a checkpoint whose optimizer state
        does not fit). RNG states are restored only when the layout is unchanged. Collective.
        """
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        path = Path(path)
        if verify:
            status = self.verify(path)
            if not status.loadable:
                if not looks_like_checkpoint(path):
                    read_marker(path)  # raises its own "not a checkpoint" message, with the fix
                raise CheckpointError(f"{path}: {status.reason}. {choose_another(path)}")
        saved = read_marker(path)
        if saved.get("weights_only"):  # `transxssm convert --to megatron`: no optimizer, scheduler or RNG state
            load_optimizer = load_rng = False
        verified = saved.get("files") is not None
        if not verified and _rank() == 0:
            logger.warning("%s: saved before checkpoints recorded file sizes and checksums, so it cannot be "
                           "verified; loading it as it is", path)
        saved_layout, layout = saved.get("layout"), current_layout()
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

        if not verified:  # at least name the files dist_checkpointing cannot do without
            for name in ("metadata.json", ".metadata"):
                if not (path / name).is_file():
                    raise CheckpointError(f"{path}: {name} is missing. {choose_another(path)}")
        try:
            loaded = dist_checkpointing.load(request, str(path))
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            if verified:  # the files are as saved: the request does not fit them
                hint = (" If only the optimizer state fails to load (e.g. another optimizer type), "
                        "CheckpointManager.load(..., load_optimizer=False) starts from the saved weights with a "
                        "fresh optimizer and schedule.") if with_optimizer else ""
            else:
                hint = (" Its files carry no recorded checksums, so damage cannot be ruled out: choose another "
                        f"checkpoint (transxssm checkpoint list {path.parent}).")
            raise CheckpointError(f"{path}: loading failed at {layout_text(layout)} (saved at "
                                  f"{layout_text(saved_layout)}), {_files_involved(err, path)}: "
                                  f"{_describe_failure(err).rstrip('.')}.{hint}") from err

        try:
            n = len(model_chunks)
            for i, chunk in enumerate(model_chunks):
                _unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
            if with_optimizer:
                _fit_optimizer_state(loaded["optimizer"], current_ids)
                optimizer.load_state_dict(loaded["optimizer"])
                if scheduler is not None and loaded.get("scheduler") is not None:
                    scheduler.load_state_dict(loaded["scheduler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: the saved state does not fit this model or optimizer (another model "
                                  f"config?): {_describe_failure(err)}") from err
        if restore_rng:
            restore_rng_state(loaded["rng_state"])
        elif load_rng and _rank() == 0:
            logger.warning("%s was saved at layout %s, now %s: RNG states not restored (per-rank streams do not "
                           "carry over to a different layout); training continues but not bit-identically.",
                           path, saved_layout, layout)
        _barrier()
        return dict(loaded.get("train_state") or {})

    def load_latest(self, model_chunks: list, optimizer=None, scheduler=None, **kwargs) -> dict | None:
        """`--resume auto`: load `newest_intact()` and return its train_state (None when there is no checkpoint).
        Each newer checkpoint skipped as damaged or incomplete is logged (rank 0)."""
        path, skipped = self.newest_intact()
        if _rank() == 0:
            for status in skipped:
                logger.warning("skipped checkpoint %s: %s", status.path, status.reason)
        if path is None:
            return None
        return self.load(path, model_chunks, optimizer, scheduler, verify=False, **kwargs)


def layout_text(layout: Optional[dict]) -> str:
    """A recorded layout as `tp=2 pp=2 dp=4` (and ` cp=2` when it used context parallelism)."""
    if not layout:
        return "an unrecorded layout"
    text = "tp={tp} pp={pp} dp={dp}".format(**{k: layout.get(k, "?") for k in ("tp", "pp", "dp")})
    return text + (f" cp={layout['cp']}" if "cp" in layout else "")


def _failures(err: BaseException) -> list[tuple[str, BaseException]]:
    """(who, exception) pairs: one per failed rank of torch's CheckpointException (whose own str() is a traceback
    per rank), else the error itself."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return [(f"rank {rank}", pair[0] if isinstance(pair, tuple) else pair)
                for rank, pair in sorted(failures.items())]
    return [("", err)]


def _describe_failure(err: BaseException) -> str:
    """One line: each distinct failure as `Type: message`, with the ranks that hit it."""
    by_message: dict[str, list[str]] = {}
    for who, exc in _failures(err):
        by_message.setdefault(f"{type(exc).__name__}: {one_line(exc, 200)}", []).append(who)
    parts = [(f"{', '.join(w for w in who if w)}: " if any(who) else "") + message
             for message, who in by_message.items()]
    return "; ".join(parts)


def _files_involved(err: BaseException, folder: Path) -> str:
    """`reading X, Y`: the checkpoint files the error names, else all those the load reads (summarised if many)."""
    text = " ".join(str(exc) for _, exc in _failures(err))
    present = sorted(files_of(folder)) if folder.is_dir() else []
    quoted = re.findall(re.escape(str(folder)) + r"/([^\s'\"]+)", text)
    shown = list(dict.fromkeys(quoted + [name for name in present if name in text])) or present
    if len(shown) > 4:
        shown = shown[:3] + [f"{len(shown) - 3} more files"]
    return f"reading {', '.join(shown)}" if shown else "(no files in the folder)"
