"""Preemption: turn SIGTERM / SIGUSR1 into "save a checkpoint at the next step boundary and exit cleanly".

SLURM sends SIGUSR1 some time before the time limit (`#SBATCH --signal=USR1@120`) and SIGTERM on preemption or
`scancel`; torchrun forwards both to its workers when started with `--signals-to-handle` (launch/slurm/).
A signal can reach one rank before another, or only some ranks, so the decision is collective:

    handler = PreemptionHandler()                   # installs the handlers
    for step in ...:
        train_step(...)
        if handler.should_stop():                   # all-reduce of the flag: every rank gets the same answer
            manager.save(step, ...)
            handler.mark_preempted(run_dir, step)   # rank 0 writes run_dir/PREEMPTED; the sbatch requeues
            return 0

The handler only sets a flag: saving inside a signal handler could interrupt a collective half-way.
A second signal of the same kind does not kill the process either; SLURM escalates to SIGKILL itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTED_MARKER = "PREEMPTED"


class PreemptionHandler:
    """Installs handlers for `signals` (names or numbers) that set `.requested`; `uninstall()` restores them."""

    def __init__(self, signals=DEFAULT_SIGNALS, install: bool = True):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        if install:
            self.install()

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            # Python runs handlers between bytecodes in the main thread; logging here is safe enough.
            logger.warning("received %s: will save a checkpoint and stop at the end of this step", self.signal_name)
        self.requested = True

    def should_stop(self, group=None) -> bool:
        """True on every rank as soon as any rank has received a signal. Collective when distributed."""
        return self.poll(group=group)[0]

    def poll(self, *flags: bool, group=None) -> tuple[bool, ...]:
        """(a signal reached any rank, then each of `flags` is true on any rank): one all-reduce for the loop's
        per-step stop checks (the training loop adds its time limit). Collective when distributed over more than
        one rank; over NCCL it waits for the GPU's queue, so the loop passes a gloo group where it has one."""
        local = [self.requested, *flags]
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
                torch.distributed.get_world_size(group) == 1:
            return tuple(bool(f) for f in local)
        backend = torch.distributed.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        agreed = torch.tensor([1 if f else 0 for f in local], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=group)
        agreed = [bool(v) for v in agreed.tolist()]
        if agreed[0] and not self.requested:
            self.requested = True
            self.signal_name = self.signal_name or "peer rank"
        return tuple(agreed)

    def mark_preempted(self, run_dir: str | os.PathLike, step: int) -> Path | None:
        """Rank 0 writes `run_dir/PREEMPTED` (JSON: step, signal, time): the launcher's cue to requeue the job."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != 0:
            return None
        path = Path(run_dir) / PREEMPTED_MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "signal": self.signal_name,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "slurm_job_id": os.environ.get("SLURM_JOB_ID")}) + "\n")
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.uninstall()
        return False
