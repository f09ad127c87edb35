"""What every benchmark result records about its run: date, commit, GPU, library versions and the command.

    from run_record import environment          # bench/ is on sys.path when a bench script runs
    result = {"benchmark": "NAME", **environment("triton", "megatron.core"), ...}
"""

from __future__ import annotations

import datetime
import importlib
import os
import subprocess
import sys
from pathlib import Path

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


def environment(*packages: str) -> dict:
    """date, commit, gpu, python, torch, cuda, the version of each named package (None when it does not import;
    `megatron.core` is recorded as `megatron_core`) and the command line."""
    import torch

    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in packages:
        try:
            record[name.replace(".", "_")] = importlib.import_module(name).__version__
        except ImportError:
            record[name.replace(".", "_")] = None
    record["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    return record
