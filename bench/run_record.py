"""What every benchmark result records about its run: date, commit, GPU, library versions and the command; the
GPU's clock and power while a run lasts; and the spreading of a benchmark's runs over the GPUs of one machine.

    from run_record import GpuClocks, environment     # bench/ is on sys.path when a bench script runs
    result = {"benchmark": "NAME", **environment("triton", "megatron.core"), ...}
    with GpuClocks(work_dir / "clocks.csv") as clocks:
        ...                                            # the timed run
    result["gpu_clocks"] = clocks.summary()            # None without nvidia-smi
"""

from __future__ import annotations

import datetime
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """TRANSXSSM_COMMIT if set (a copy of the tree without its git history), else the checkout's HEAD."""
    if os.environ.get("TRANSXSSM_COMMIT"):
        return os.environ["TRANSXSSM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_uuids() -> list[str]:
    """The UUID of every GPU this process sees, in CUDA's order (empty without CUDA): two records holding the same
    UUID ran on the same physical GPU, whichever call or container they came from."""
    import torch

    if not torch.cuda.is_available():
        return []
    uuids = (str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))
    return [u if u.startswith("GPU-") else f"GPU-{u}" for u in uuids]   # nvidia-smi's spelling


def environment(*packages: str) -> dict:
    """date, commit, gpu, gpu_uuids, python, torch, cuda, the version of each named package (None when it does not
    import; `megatron.core` is recorded as `megatron_core`), the command line, and the TRANSXSSM_* environment
    variables set (`TRANSXSSM_CONV_KERNELS=0`, `TRANSXSSM_ADAMW=torch` choose other kernels) and
    CUBLAS_WORKSPACE_CONFIG where the command's environment sets it (training chooses one otherwise)."""
    import torch

    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "gpu_uuids": gpu_uuids(),
              "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in packages:
        try:
            record[name.replace(".", "_")] = importlib.import_module(name).__version__
        except ImportError:
            record[name.replace(".", "_")] = None
    record["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    record["environment_variables"] = {k: v for k, v in sorted(os.environ.items())
                                       if k.startswith("TRANSXSSM_") or k == "CUBLAS_WORKSPACE_CONFIG"}
    return record


POWER_CAP = 0x4   # nvidia-smi's clock event reason bit: the software power cap holds the clock down


def summarize_clocks(lines: list[str], busy_watts: float = 300.0) -> dict | None:
    """nvidia-smi samples "sm_clock_mhz, power_w, power_limit_w, reasons_hex" (csv, no header, no units) -> their
    summary over the samples drawing more than busy_watts (the run itself, not its start-up or compilation); None
    when no sample does."""
    samples = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16)))
        except (IndexError, ValueError):
            continue   # a partial last line, or "[N/A]"
    busy = [s for s in samples if s[1] > busy_watts]
    if not busy:
        return None
    clocks, watts = [s[0] for s in busy], [s[1] for s in busy]
    capped = sum(1 for s in busy if s[3] & POWER_CAP)
    return {"samples": len(busy), "sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_min": min(clocks),
            "sm_clock_mhz_max": max(clocks), "power_w_median": round(statistics.median(watts), 1),
            "power_limit_w": busy[0][2], "power_capped_share": round(capped / len(busy), 3)}


class GpuClocks:
    """nvidia-smi sampling one GPU's SM clock, power draw, power limit and clock event reasons every 0.5 s into
    `path` while the `with` block lasts; nothing where nvidia-smi is missing. `gpu` is nvidia-smi's index (the
    machine's numbering, which CUDA_VISIBLE_DEVICES does not change: `GpuSlot.smi_index`)."""

    QUERY = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"

    def __init__(self, path: Path, gpu: str = "0"):
        self.path, self.gpu, self.proc = Path(path), gpu, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            with open(self.path, "w") as out:
                self.proc = subprocess.Popen(["nvidia-smi", "-i", self.gpu, f"--query-gpu={self.QUERY}",
                                              "--format=csv,noheader,nounits", "-lms", "500"],
                                             stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        return False

    def summary(self) -> dict | None:
        if self.proc is None or not self.path.exists():
            return None
        return summarize_clocks(self.path.read_text().splitlines())


class GpuSlot:
    """The i-th group of `count` GPUs this process may use: `env` for a child process that should see only them,
    `smi_index` for nvidia-smi, the machine's index of the group's first GPU (CUDA_VISIBLE_DEVICES="2,3" makes
    slot 1 the machine's GPU 3)."""

    def __init__(self, i: int, count: int = 1):
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        gpus = [visible[g] if visible else str(g) for g in range(i * count, (i + 1) * count)]
        self.index, self.smi_index = i, gpus[0]
        self.env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}


Item, Result = TypeVar("Item"), TypeVar("Result")


def on_gpus(items: Sequence[Item], gpus: int, work: Callable[[Item, GpuSlot], Result],
            done: Callable[[list], None] = lambda results: None, per_item: int = 1) -> list[Result]:
    """work(item, slot) for every item, gpus // per_item of them at once, each on `per_item` GPUs of its own: a
    slot takes the next item as soon as its last one ends. After each item, done(results so far, in the items'
    order, None where not run yet). Returns the results in the items' order; the first error stops the handing
    out of items and is raised."""
    results: list = [None] * len(items)
    lock, pending, errors = threading.Lock(), list(enumerate(items)), []

    def worker(slot: GpuSlot) -> None:
        while True:
            with lock:
                if errors or not pending:
                    return
                i, item = pending.pop(0)
            try:
                result = work(item, slot)
            except BaseException as error:   # re-raised in the caller's thread
                with lock:
                    errors.append(error)
                return
            with lock:
                results[i] = result
                done(list(results))

    slots = gpus // per_item
    if slots == 1:
        worker(GpuSlot(0, per_item))
    else:
        threads = [threading.Thread(target=worker, args=(GpuSlot(g, per_item),), daemon=True) for g in range(slots)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results
