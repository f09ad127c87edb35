"""Checkpoint integrity: what a checkpoint folder must hold to be loaded, and the folders that may be deleted.

Guarantees, for a checkpoint dir written by `CheckpointManager.save` (checkpointing.py):
- A folder `iter_XXXXXXX` with a COMPLETE marker holds exactly what was saved: the marker lists every file with
  its size and sha256, and `inspect_checkpoint` reports each file that is missing, of another size or of another
  checksum by name. A truncated, deleted or overwritten file is never loaded (dist_checkpointing reads shards at
  recorded offsets and has no checksums of its own: random bytes in a `.distcp` load silently and train to NaN).
- A folder without the marker (a `.tmp` folder, or one whose marker is gone) is never loaded.
- Nothing is deleted in favour of a damaged checkpoint: stale-folder cleaning deletes only unmarked folders older
  than a checkpoint known to be intact, and retention (`retire_old`) counts only checkpoints that pass the size
  check, so the newest `keep_last` loadable checkpoints always survive.
- Deleting renames to `.trash` first: a kill halfway leaves a `.trash` folder (removed by the next cleaning),
  never a half-deleted folder under a checkpoint's name.

Markers written before the file list existed (`files` absent) are "unverifiable": loadable, with a note.

Stale-folder cleaning (`clean_stale_folders`, rank 0: at start after the resume checkpoint is chosen, and after
every save). Deleted: `.trash` folders (retired checkpoints whose deletion was cut short), and `.tmp` or unmarked
`iter_*` folders of a step older than a checkpoint known to be intact (the one just verified and loaded, or just
saved): no save of an older step can still be running, and without a marker they cannot be loaded. Kept and
reported: such folders of the same or a newer step (another job may be saving into this directory), and all of
them while no intact checkpoint is known. A folder with a marker is never removed by cleaning, damaged or not;
only retention retires marked checkpoints.

Retention (`retire_old`, rank 0, after every save; `checkpoint.keep_last`, 0 or None keeps all). Walking from the
newest checkpoint down, each marked folder is size-checked against its marker (checksums are not recomputed at
every save: that would read every kept checkpoint again; a same-size overwrite is caught when a checkpoint is
verified or loaded). The first `keep_last` that pass (or are unverifiable) are kept; older ones are removed.
A damaged checkpoint does not count: it is kept and reported while it is newer than the oldest checkpoint kept
(someone may want to look at it), and removed, with a message naming the damage, once `keep_last` newer intact
checkpoints exist. So damage never costs an intact checkpoint, and a damaged one does not stay forever.

Nothing here imports torch or megatron-core: `transxssm checkpoint verify/list` use this module alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

COMPLETE_MARKER = "COMPLETE"
CHECKSUM = "sha256"
_HASH_BLOCK = 4 << 20            # bytes read per hash update: 1-8 MiB all measure the same
_HASH_THREADS = 8                # per rank; hashlib releases the GIL, so threads hash files in parallel
FINAL_NAME = re.compile(r"^iter_(\d{7,})$")
ANY_NAME = re.compile(r"^iter_(\d{7,})(\.tmp|\.trash|\.tmp\.trash)?$")  # .tmp.trash: a .tmp being deleted


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message (one line) says which file and what to do."""


def one_line(text: Any, limit: int = 400) -> str:
    """Foreign error text (tracebacks, key lists) squeezed into one line for a one-line error."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Files and their checksums

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


def hash_files(folder: Path, names: list[str], algorithm: str = CHECKSUM) -> dict[str, tuple[int, str] | OSError]:
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


def files_of(folder: Path) -> dict[str, int]:
    """{relative posix path: size} of every file under `folder` except the marker."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER:
                found[rel] = full.stat().st_size
    return found


def share_by_size(sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Split files over `workers` by bytes (largest first to the least loaded); the same answer on every rank."""
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += sizes[name]
    return shares


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
        for name, result in hash_files(folder, same_size, algorithm).items():
            if isinstance(result, OSError):
                problems.append(f"{name} cannot be read ({result.strerror or result})")
            elif result[1] != recorded[name]["checksum"]:
                problems.append(f"{name} checksum differs from the one recorded at save (the file was changed "
                                f"or corrupted)")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# The COMPLETE marker

def looks_like_checkpoint(path: Path) -> bool:
    return bool(ANY_NAME.match(path.name)) or (path / ".metadata").is_file() or any(path.glob("*.distcp"))


def choose_another(path: Path) -> str:
    """The fix to append to an error about checkpoint `path`."""
    return f"Choose another checkpoint (transxssm checkpoint list {path.parent}) or start fresh with --resume none"


def _valid_file_list(recorded: Any) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("checksum"), str)
        for e in recorded.values())


def write_marker(folder: Path, fields: dict, files: dict[str, dict]) -> None:
    """Write the COMPLETE marker of `folder` (durably): `fields` (step, layout, ...) plus the checksum algorithm and
    `files: {name: {size, checksum}}` as `record` measured them. The last file a save writes."""
    marker = {**fields, "checksum": CHECKSUM, "files": files}
    with open(folder / COMPLETE_MARKER, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())


def read_marker(path: str | os.PathLike) -> dict:
    """The COMPLETE marker of checkpoint folder `path` as a dict. CheckpointError (one line) when it is missing or
    unreadable."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; a checkpoint is a folder such as iter_0000100")
    if not marker.is_file():
        if looks_like_checkpoint(path):
            raise CheckpointError(f"{path}: no {COMPLETE_MARKER} marker: the save was interrupted. "
                                  f"{choose_another(path)}")
        inside = sorted(p.name for p in path.iterdir() if FINAL_NAME.match(p.name))
        if inside:
            raise CheckpointError(f"{path}: not a checkpoint but a folder of checkpoints; pass one of them, e.g. "
                                  f"{path / inside[-1]} (list them: transxssm checkpoint list {path})")
        raise CheckpointError(f"{path}: not a checkpoint folder (no {COMPLETE_MARKER} marker, no .metadata); pass "
                              f"one such as {path.parent / 'iter_0000100'}, or --resume auto")
    try:
        data = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: the {COMPLETE_MARKER} marker is not valid JSON (truncated or overwritten: "
                              f"{one_line(err, 80)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {COMPLETE_MARKER} marker holds {type(data).__name__}, not the JSON "
                              f"object a save writes (overwritten)")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Checking a folder against its marker

@dataclass(frozen=True)
class CheckpointStatus:
    """What `inspect_checkpoint` found. `state`: ok | bad | incomplete | unverifiable (marker of the old format,
    without a file list). `problems`: one phrase each, naming the file."""

    path: Path
    state: str
    problems: tuple[str, ...] = ()

    @property
    def step(self) -> Optional[int]:
        match = ANY_NAME.match(self.path.name)
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
        return sum(files_of(self.path).values()) if self.path.is_dir() else 0


def inspect_checkpoint(path: str | os.PathLike, checksums: bool = True, share: Optional[tuple[int, int]] = None
                       ) -> CheckpointStatus:
    """Check one checkpoint folder against its marker. `share=(rank, world)`: check only this rank's part of the
    files (the parts are balanced by size); merge the ranks' results with `merge_statuses`."""
    path = Path(path)
    if path.name.endswith(".tmp") and not (path / COMPLETE_MARKER).is_file():
        return CheckpointStatus(path, "incomplete", ("temporary folder of a save in progress or killed",))
    if path.is_dir() and not (path / COMPLETE_MARKER).exists() and looks_like_checkpoint(path):
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
        mine = share_by_size({name: entry["size"] for name, entry in recorded.items()}, world)[rank]
        recorded = {name: recorded[name] for name in mine}
    problems = check_files(path, recorded, marker.get("checksum", CHECKSUM), checksums)
    return CheckpointStatus(path, "bad" if problems else "ok", tuple(problems))


def merge_statuses(statuses: list[CheckpointStatus]) -> CheckpointStatus:
    """One status from the ranks' shares: the marker verdict of the first rank, the file problems of all."""
    first = statuses[0]
    if first.state in ("incomplete", "unverifiable"):
        return first
    problems = tuple(dict.fromkeys(p for s in statuses for p in s.problems))
    return replace(first, state="bad" if problems else "ok", problems=problems)


# ----------------------------------------------------------------------------------------------------------------
# Finding checkpoint folders

def final_folders(save_dir: Path) -> list[Path]:
    """`iter_XXXXXXX` folders of `save_dir` (no .tmp / .trash), oldest first, marked or not."""
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in save_dir.iterdir()
             if (m := FINAL_NAME.match(child.name)) and child.is_dir()]
    return [path for _, path in sorted(found)]


def marked_folders(save_dir: Path) -> list[Path]:
    """Checkpoints of `save_dir` with a COMPLETE marker, oldest first (not verified: see `inspect_checkpoint`)."""
    return [path for path in final_folders(save_dir) if (path / COMPLETE_MARKER).is_file()]


def checkpoint_folders(path: str | os.PathLike) -> list[Path]:
    """The checkpoint folders `path` stands for: itself if it is one; else the `iter_*` folders (complete or
    `.tmp`, oldest first) in it or in its `checkpoints/` (a run dir). CheckpointError if it does not exist."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a checkpoint folder, a checkpoints dir or a run dir")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; pass a checkpoint folder, a checkpoints dir or a run dir")
    if (path / COMPLETE_MARKER).exists() or looks_like_checkpoint(path):
        return [path]
    if not any(ANY_NAME.match(p.name) for p in path.iterdir()) and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = [(int(m.group(1)), child.name, child) for child in path.iterdir()
             if (m := ANY_NAME.match(child.name)) and child.is_dir() and not child.name.endswith(".trash")]
    return [child for _, _, child in sorted(found)]


# ----------------------------------------------------------------------------------------------------------------
# Deleting: stale folders and retention (rules in the module docstring)

def delete_folder(folder: Path) -> None:
    """Rename to .trash, then delete: a kill halfway leaves a .trash folder, never a half-deleted one under its
    old name."""
    trash = folder.with_name(folder.name + ".trash")
    try:
        folder.rename(trash)
    except OSError:  # gone already (another job cleaning), or a leftover .trash of the same name
        shutil.rmtree(folder, ignore_errors=True)
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale_folders(save_dir: Path, older_than: Optional[int]) -> list[str]:
    """Remove `.trash` folders, and `.tmp` or unmarked `iter_*` folders of a step below `older_than` (the step of
    a checkpoint known to be intact; None: none is known). One message per folder removed or deliberately kept."""
    if not save_dir.is_dir():
        return []
    messages = []
    for child in sorted(save_dir.iterdir()):
        match = ANY_NAME.match(child.name)
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
            delete_folder(child)
            messages.append(f"removed {child}: {what} that never finished, older than the intact checkpoint "
                            f"iter_{older_than:07d}")
        elif suffix == ".tmp":
            messages.append(f"left {child} in place: {what} that another job may still be writing; a later "
                            f"save removes it once it is older than an intact checkpoint")
    return messages


def retire_old(save_dir: Path, keep_last: Optional[int], intact: Optional[Path] = None) -> list[str]:
    """Keep the newest `keep_last` loadable checkpoints of `save_dir` (None or 0: keep all) and remove older
    ones; damaged checkpoints do not count (see the module docstring). `intact`: a checkpoint known to be intact
    (just saved), not checked again. Returns one message per damaged checkpoint kept or removed (removing an
    intact checkpoint beyond `keep_last` is routine and not reported)."""
    if not keep_last:
        return []
    messages, kept = [], 0
    for folder in reversed(marked_folders(save_dir)):
        status = (CheckpointStatus(folder, "ok") if intact is not None and folder == intact
                  else inspect_checkpoint(folder, checksums=False))
        if status.loadable:
            kept += 1
            if kept > keep_last:
                delete_folder(folder)
        elif kept >= keep_last:
            delete_folder(folder)
            messages.append(f"removed damaged checkpoint {folder} ({status.reason}): {keep_last} newer intact "
                            f"checkpoint(s) exist")
        else:
            messages.append(f"kept damaged checkpoint {folder} ({status.reason}) for inspection; it does not count "
                            f"towards checkpoint.keep_last={keep_last} and is removed once {keep_last} newer intact "
                            f"checkpoint(s) exist")
    return messages
