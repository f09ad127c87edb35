"""Run a function on N local gloo ranks with megatron-core's model parallel state initialised (tests only).

    results = run_distributed(fn, world_size, *args, tp=1, pp=1, vpp=None, cp=1, seed=1234, timeout_s=300)

`fn(*args)` runs in every rank after `torch.distributed.init_process_group("gloo")`, the CPU shim
(transxssm_megatron/training/cpu_backend.py) and megatron's `parallel_state.initialize_model_parallel` with the
tp, pp, vpp and cp (context_parallel_size) given; the RNG is seeded with `seed` (same on every rank).
`results[r]` is rank r's return value (must be picklable). If any rank raises, a RuntimeError carrying that
rank's traceback is raised here and the other ranks are stopped; a rank that hangs (e.g. a collective some rank
never joined) is killed after `timeout_s`.

`fn` must be importable by name from a module (a top-level function of a test module is fine): ranks are
forked from a clean "forkserver" process that has torch and megatron-core preloaded, so each run costs well
under a second of start-up instead of a full import in every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_PRELOAD = ["torch", "megatron.core.parallel_state", "megatron.core.models.hybrid.hybrid_model",
            "megatron.core.pipeline_parallel"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(rank: int, world_size: int, port: int, tp: int, pp: int, vpp, cp: int, seed: int, timeout_s: float,
               tests_dir: str, fn: Callable, args: tuple, results) -> None:
    # The test directory is on the parent's sys.path via pytest; make the helper modules importable here too.
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    # Share the cores between the ranks (2 ranks on 2 cores: one thread each) unless OMP_NUM_THREADS says.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS=threads)
    try:
        import torch

        torch.set_num_threads(int(threads))
        from transxssm_megatron.training.cpu_backend import install_cpu_backend

        install_cpu_backend()
        from megatron.core import parallel_state
        from megatron.core import tensor_parallel

        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                             timeout=timedelta(seconds=timeout_s))
        try:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                     pipeline_model_parallel_size=pp,
                                                     virtual_pipeline_model_parallel_size=vpp,
                                                     context_parallel_size=cp)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(seed)
            payload = pickle.dumps(fn(*args))  # pickle here so an unpicklable result is reported, not lost
            results.put((rank, "ok", payload))
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, with the rank's traceback
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, tp: int = 1, pp: int = 1, vpp: int | None = None,
                    cp: int = 1, seed: int = 1234, timeout_s: float = 300.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks (tp * pp * cp must divide world_size; vpp: virtual pipeline
    stages per rank, None for none; cp: context parallel size); return the per-rank results."""
    if world_size % (tp * pp * cp):
        raise ValueError(f"world_size {world_size} is not a multiple of tp*pp*cp = {tp * pp * cp}")
    ctx = _context()
    results = ctx.Queue()
    port = _free_port()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    procs = [ctx.Process(target=_rank_main, name=f"rank{r}",
                         args=(r, world_size, port, tp, pp, vpp, cp, seed, timeout_s, tests_dir, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                dead = [r for r in missing if procs[r].exitcode not in (None, 0)]
                if dead:  # killed by a signal or os._exit: nothing will ever come from it
                    raise RuntimeError(f"run_distributed({fn.__name__}): rank {dead[0]} exited with code "
                                       f"{procs[dead[0]].exitcode} without a result") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run_distributed({fn.__name__}): ranks {missing} gave no result within "
                                       f"{timeout_s:.0f} s (hung in a collective?)") from None
                continue
            if status == "error":
                raise RuntimeError(f"run_distributed({fn.__name__}): rank {rank} of {world_size} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(collected) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [collected[r] for r in range(world_size)]
