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

Integrity. Loading checks every recorded file's size and checksum first (`inspect_checkpoint`; about 1 GB/s per
core, see `file_checksum`), so a truncated, overwritten or missing file is reported by name instead of loading
garbage (dist_checkpointing reads shards at recorded offsets and has no checksums: random bytes in a `.distcp`
load silently and train to NaN). `--resume auto` takes the newest intact checkpoint and warns about each newer one
it skipped; a PATH that fails the check is refused. Markers written before the file list existed load with a note
that they cannot be verified.

Cleaning (`clean_stale`, rank 0: at start after the resume checkpoint is chosen, and after every save). Deleted:
`.trash` folders (retired checkpoints whose deletion was cut short), and `.tmp` or unmarked `iter_*` folders of a
step older than a checkpoint known to be intact (the one just verified and loaded, or just saved): no save of an
older step can still be running, and without a marker they cannot be loaded. Kept and reported: such folders of
the same or a newer step (another job may be saving into this directory), and all of them while no intact
checkpoint is known (nothing is deleted in favour of a damaged one). A save also removes the `.tmp` of the step
it is about to write. A folder with a marker is never removed by cleaning, damaged or not (only
`checkpoint.keep_last` retires complete checkpoints). Deleting renames to `.trash` first, so a kill halfway leaves
a `.trash` folder, never a half-deleted one under a checkpoint's name.

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

torch and megatron-core are imported inside the functions that use them: `transxssm checkpoint verify/list` use
this module's integrity half without either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
CHECKSUM = "sha256"
_HASH_BLOCK = 4 << 20            # bytes read per hash update: 1-8 MiB all measure the same
_HASH_THREADS = 8                # per rank; hashlib releases the GIL, so threads hash files in parallel
_FINAL_NAME = re.compile(r"^iter_(\d{7,})$")
_ANY_NAME = re.compile(r"^iter_(\d{7,})(\.tmp|\.trash|\.tmp\.trash)?$")  # .tmp.trash: a .tmp being deleted


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message (one line) says which file and what to do."""


def _one_line(text: Any, limit: int = 400) -> str:
    """Foreign error text (tracebacks, key lists) squeezed into one line for a one-line error."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
# Integrity: what the COMPLETE marker records, and checking a folder against it (no torch, no process group)

def file_checksum(path: Path, algorithm: str = CHECKSUM) -> tuple[int, str]:
    """(bytes read, hex digest) of one file, streamed in 4 MiB blocks.

    Speed, measured on a 100 MB file in the page cache, one core of an Intel Xeon with SHA extensions: sha256
    0.93-1.07 GB/s, blake2b 0.43-0.64 GB/s (hence sha256; CPUs without SHA extensions favour blake2b, and the
    marker names its algorithm, so a later change stays readable). Two threads on two files: 1.85 GB/s. A save
    or load hashes its files in `_HASH_THREADS` threads per rank, spread over all ranks."""
    digest = hashlib.new(algorithm)
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _hash_files(folder: Path, names: list[str], algorithm: str = CHECKSUM) -> dict[str, tuple[int, str] | OSError]:
    """{name: (size, digest)} for files of `folder`, or the OSError that stopped reading one."""
    def one(name: str) -> tuple[int, str] | OSError:
        try:
            return file_checksum(folder / name, algorithm)
        except OSError as err:
            return err

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(names), _HASH_THREADS, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(one, names)))


def _files_of(folder: Path) -> dict[str, int]:
    """{relative posix path: size} of every file under `folder` except the marker."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER:
                found[rel] = full.stat().st_size
    return found


def _share(sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Split files over `workers` by bytes (largest first to the least loaded); the same answer on every rank."""
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += sizes[name]
    return shares


def _looks_like_checkpoint(path: Path) -> bool:
    return bool(_ANY_NAME.match(path.name)) or (path / ".metadata").is_file() or any(path.glob("*.distcp"))


def _choose_another(path: Path) -> str:
    return f"Choose another checkpoint (transxssm checkpoint list {path.parent}) or start fresh with --resume none"


def _valid_file_list(recorded: Any) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("checksum"), str)
        for e in recorded.values())


def read_marker(path: str | os.PathLike) -> dict:
    """The COMPLETE marker of checkpoint folder `path` as a dict. CheckpointError (one line) when it is missing or
    unreadable."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; a checkpoint is a folder such as iter_0000100")
    if not marker.is_file():
        if _looks_like_checkpoint(path):
            raise CheckpointError(f"{path}: no {COMPLETE_MARKER} marker: the save was interrupted. "
                                  f"{_choose_another(path)}")
        inside = sorted(p.name for p in path.iterdir() if _FINAL_NAME.match(p.name))
        if inside:
            raise CheckpointError(f"{path}: not a checkpoint but a folder of checkpoints; pass one of them, e.g. "
                                  f"{path / inside[-1]} (list them: transxssm checkpoint list {path})")
        raise CheckpointError(f"{path}: not a checkpoint folder (no {COMPLETE_MARKER} marker, no .metadata); pass "
                              f"one such as {path.parent / 'iter_0000100'}, or --resume auto")
    try:
        data = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: the {COMPLETE_MARKER} marker is not valid JSON (truncated or overwritten: "
                              f"{_one_line(err, 80)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {COMPLETE_MARKER} marker holds {type(data).__name__}, not the JSON "
                              f"object a save writes (overwritten)")
    return data


def check_files(folder: Path, recorded: dict[str, dict], algorithm: str = CHECKSUM,
                checksums: bool = True) -> list[str]:
    """One phrase per recorded file of `folder` that is missing, of another size or (with `checksums`) of another
    checksum than the marker says; [] when all match. Files the marker does not list are ignored."""
    problems, same_size = [], []
    for name, entry in sorted(recorded.items()):
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != entry["size"]:
            problems.append(f"{name} is {size} bytes, the checkpoint recorded {entry['size']} "
                            f"(truncated or overwritten)")
        else:
            same_size.append(name)
    if checksums:
        for name, result in _hash_files(folder, same_size, algorithm).items():
            if isinstance(result, OSError):
                problems.append(f"{name} cannot be read ({result.strerror or result})")
            elif result[1] != recorded[name]["checksum"]:
                problems.append(f"{name} checksum differs from the one recorded at save (the file was changed "
                                f"or corrupted)")
    return problems


@dataclass(frozen=True)
class CheckpointStatus:
    """What `inspect_checkpoint` found. `state`: ok | bad | incomplete | unverifiable (marker of the old format,
    without a file list). `problems`: one phrase each, naming the file."""

    path: Path
    state: str
    problems: tuple[str, ...] = ()

    @property
    def step(self) -> Optional[int]:
        match = _ANY_NAME.match(self.path.name)
        return int(match.group(1)) if match else None

    @property
    def loadable(self) -> bool:
        return self.state in ("ok", "unverifiable")

    @property
    def reason(self) -> str:
        shown = "; ".join(self.problems[:3])
        more = len(self.problems) - 3
        return shown + (f"; and {more} more" if more > 0 else "")

    def describe(self) -> str:
        """The status column of `transxssm checkpoint list`."""
        if self.state == "unverifiable":
            return "unverifiable (old format: no recorded sizes or checksums)"
        return self.state if self.state == "ok" else f"{self.state}: {self.reason}"

    def size(self) -> int:
        """Bytes of all files in the folder (0 if it is gone)."""
        return sum(_files_of(self.path).values()) if self.path.is_dir() else 0


def inspect_checkpoint(path: str | os.PathLike, checksums: bool = True, share: Optional[tuple[int, int]] = None
                       ) -> CheckpointStatus:
    """Check one checkpoint folder against its marker. `share=(rank, world)`: check only this rank's part of the
    files (the parts are balanced by size); merge the ranks' results with `_merge_statuses`."""
    path = Path(path)
    if path.name.endswith(".tmp") and not (path / COMPLETE_MARKER).is_file():
        return CheckpointStatus(path, "incomplete", ("temporary folder of a save in progress or killed",))
    if path.is_dir() and not (path / COMPLETE_MARKER).exists() and _looks_like_checkpoint(path):
        return CheckpointStatus(path, "incomplete", (f"no {COMPLETE_MARKER} marker: the save was interrupted",))
    try:
        marker = read_marker(path)
    except CheckpointError as err:
        return CheckpointStatus(path, "bad", (str(err).removeprefix(f"{path}: "),))
    recorded = marker.get("files")
    if recorded is None:
        return CheckpointStatus(path, "unverifiable")
    if not _valid_file_list(recorded) or marker.get("checksum", CHECKSUM) not in hashlib.algorithms_available:
        return CheckpointStatus(path, "bad", (f"the {COMPLETE_MARKER} marker's file list is malformed "
                                              f"(overwritten)",))
    if share is not None:
        rank, world = share
        mine = _share({name: entry["size"] for name, entry in recorded.items()}, world)[rank]
        recorded = {name: recorded[name] for name in mine}
    problems = check_files(path, recorded, marker.get("checksum", CHECKSUM), checksums)
    return CheckpointStatus(path, "bad" if problems else "ok", tuple(problems))


def _merge_statuses(statuses: list[CheckpointStatus]) -> CheckpointStatus:
    """One status from the ranks' shares: the marker verdict of the first rank, the file problems of all."""
    first = statuses[0]
    if first.state in ("incomplete", "unverifiable"):
        return first
    problems = tuple(dict.fromkeys(p for s in statuses for p in s.problems))
    return replace(first, state="bad" if problems else "ok", problems=problems)


def checkpoint_folders(path: str | os.PathLike) -> list[Path]:
    """The checkpoint folders `path` stands for: itself if it is one; else the `iter_*` folders (complete or
    `.tmp`, oldest first) in it or in its `checkpoints/` (a run dir). CheckpointError if it does not exist."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a checkpoint folder, a checkpoints dir or a run dir")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; pass a checkpoint folder, a checkpoints dir or a run dir")
    if (path / COMPLETE_MARKER).exists() or _looks_like_checkpoint(path):
        return [path]
    if not any(_ANY_NAME.match(p.name) for p in path.iterdir()) and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = [(int(m.group(1)), child.name, child) for child in path.iterdir()
             if (m := _ANY_NAME.match(child.name)) and child.is_dir() and not child.name.endswith(".trash")]
    return [child for _, _, child in sorted(found)]


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
    """Save / find / verify / load checkpoints under `save_dir`, keeping the newest `keep_last` (None or 0: all).

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

    def _final_folders(self) -> list[Path]:
        """`iter_XXXXXXX` folders (no .tmp / .trash), oldest first, marked or not."""
        if not self.save_dir.is_dir():
            return []
        found = [(int(m.group(1)), child) for child in self.save_dir.iterdir()
                 if (m := _FINAL_NAME.match(child.name)) and child.is_dir()]
        return [path for _, path in sorted(found)]

    def list_complete(self) -> list[Path]:
        """Checkpoints with a COMPLETE marker, oldest first (not verified: see `verify`)."""
        return [path for path in self._final_folders() if (path / COMPLETE_MARKER).is_file()]

    def latest(self) -> Path | None:
        """The newest checkpoint with a COMPLETE marker, or None. Not verified: `newest_intact()` is."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        match = _FINAL_NAME.match(Path(path).name)
        if not match:
            raise CheckpointError(f"{path}: not a checkpoint folder name (expected iter_XXXXXXX)")
        return int(match.group(1))

    def verify(self, path: str | os.PathLike) -> CheckpointStatus:
        """Sizes and checksums of `path` against its marker, the hashing spread over all ranks. Collective; every
        rank gets the same status."""
        path = Path(path)
        rank, world = _rank(), _world_size()
        return _merge_statuses(_gathered(inspect_checkpoint(path, share=(rank, world) if world > 1 else None)))

    def newest_intact(self) -> tuple[Path | None, list[CheckpointStatus]]:
        """The newest checkpoint that passes `verify` (or has an old, unverifiable marker) and the status of each
        newer folder skipped on the way. None when there is none; CheckpointError when checkpoints with a marker
        exist but every one of them is damaged (starting from scratch would silently drop the run). Collective."""
        skipped = []
        for path in reversed(_from_rank0(self._final_folders() if _rank() == 0 else None)):
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
        """Remove what interrupted saves left behind (rules in the module docstring). `intact`: a checkpoint known
        to be intact (just verified and loaded), or None (then only `.trash` folders go; so, too, when it lies
        outside this dir). Returns one message per folder removed or deliberately kept. Rank 0 acts, the others
        wait. Collective."""
        older_than = None
        if intact is not None and Path(intact).resolve().parent == self.save_dir.resolve():
            match = _FINAL_NAME.match(Path(intact).name)
            older_than = int(match.group(1)) if match else None
        messages = self._clean_stale(older_than) if _rank() == 0 else []
        _barrier()
        return messages

    def _clean_stale(self, older_than: Optional[int]) -> list[str]:
        if not self.save_dir.is_dir():
            return []
        messages = []
        for child in sorted(self.save_dir.iterdir()):
            match = _ANY_NAME.match(child.name)
            if not match or not child.is_dir():
                continue
            step, suffix = int(match.group(1)), match.group(2)
            if suffix and suffix.endswith(".trash"):
                shutil.rmtree(child, ignore_errors=True)
                messages.append(f"removed {child}: a retired checkpoint whose deletion was cut short")
                continue
            if suffix is None and (child / COMPLETE_MARKER).is_file():
                continue  # marked: never removed here, damaged or not
            what = "temporary folder of a save" if suffix == ".tmp" else f"folder without a {COMPLETE_MARKER} marker"
            if older_than is not None and step < older_than:
                self._delete(child)
                messages.append(f"removed {child}: {what} that never finished, older than the intact checkpoint "
                                f"iter_{older_than:07d}")
            elif suffix == ".tmp":
                messages.append(f"left {child} in place: {what} that another job may still be writing; a later "
                                f"save removes it once it is older than an intact checkpoint")
        return messages

    @staticmethod
    def _delete(folder: Path) -> None:
        """Rename to .trash, then delete: a kill halfway leaves a .trash folder, never a half-deleted one under its
        old name."""
        trash = folder.with_name(folder.name + ".trash")
        try:
            folder.rename(trash)
        except OSError:  # gone already (another job cleaning), or a leftover .trash of the same name
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(trash, ignore_errors=True)

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
                self._delete(tmp)
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
            marker = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "layout": state["layout"], "format_version": FORMAT_VERSION, "checksum": CHECKSUM,
                      "files": files}
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
            for message in self._clean_stale(older_than=step):  # this checkpoint is intact by construction
                if message.startswith("removed"):
                    logger.warning("%s", message)
            logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        _barrier()  # nobody proceeds (or exits) before the checkpoint is visible under its final name
        return final

    @staticmethod
    def _record_files(folder: Path) -> dict[str, dict]:
        """{name: {size, checksum}} of every file in `folder`; each rank hashes a share. Collective."""
        sizes = _from_rank0(_files_of(folder) if _rank() == 0 else None)  # one listing, not one per rank
        mine = _share(sizes, _world_size())[_rank()]
        files = {}
        for part in _gathered(_hash_files(folder, mine)):
            for name, result in part.items():
                if isinstance(result, OSError):
                    raise CheckpointError(f"{folder / name}: cannot be read back after the save ({result}); check "
                                          f"the file system of {folder.parent}")
                files[name] = {"size": result[0], "checksum": result[1]}
        return dict(sorted(files.items()))

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
                if not _looks_like_checkpoint(path):
                    read_marker(path)  # raises its own "not a checkpoint" message, with the fix
                raise CheckpointError(f"{path}: {status.reason}. {_choose_another(path)}")
        saved = read_marker(path)
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
                    raise CheckpointError(f"{path}: {name} is missing. {_choose_another(path)}")
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
            raise CheckpointError(f"{path}: loading failed at {_layout_text(layout)} (saved at "
                                  f"{_layout_text(saved_layout)}), {_files_involved(err, path)}: "
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


def _layout_text(layout: Optional[dict]) -> str:
    if not layout:
        return "an unrecorded layout"
    return "tp={tp} pp={pp} dp={dp}".format(**{k: layout.get(k, "?") for k in ("tp", "pp", "dp")})


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
        by_message.setdefault(f"{type(exc).__name__}: {_one_line(exc, 200)}", []).append(who)
    parts = [(f"{', '.join(w for w in who if w)}: " if any(who) else "") + message
             for message, who in by_message.items()]
    return "; ".join(parts)


def _files_involved(err: BaseException, folder: Path) -> str:
    """`reading X, Y`: the checkpoint files the error names, else all those the load reads (summarised if many)."""
    text = " ".join(str(exc) for _, exc in _failures(err))
    present = sorted(_files_of(folder)) if folder.is_dir() else []
    quoted = re.findall(re.escape(str(folder)) + r"/([^\s'\"]+)", text)
    shown = list(dict.fromkeys(quoted + [name for name in present if name in text])) or present
    if len(shown) > 4:
        shown = shown[:3] + [f"{len(shown) - 3} more files"]
    return f"reading {', '.join(shown)}" if shown else "(no files in the folder)"
