"""Test-only CPU shim: lets megatron-core 0.19.2 run over gloo on a machine without CUDA.

Never imported by product code. `install_cpu_shim()` is idempotent and patches exactly what
docs/ENGINEERING.md ("Running megatron-core on CPU") lists:

1. `torch.cuda.current_device()` returns the CPU device (GlobalMemoryBuffer, p2p shape buffers).
2. RNG: `model_parallel_cuda_manual_seed(seed)` becomes `torch.manual_seed(seed)`; the CUDA RNG tracker's
   `add` only records the name and `fork` is a no-op context (there is no CUDA generator to fork).
3. `device="cuda"` literals in `pipeline_parallel/schedules.py` go to CPU; `torch.cuda.synchronize` is a no-op.
   Pipeline runs over gloo also need `TransformerConfig(batch_p2p_sync=False)` (set by the caller).
4. `Tensor.cuda()` returns the tensor itself (LanguageModule moves the tied output-layer copy of the
   embedding to CUDA before its first-stage/last-stage all-reduce when pp > 1).
5. Megatron's own attention builds its default causal mask on CUDA; our SA mixer does not use it, so nothing to
   patch here.
Everything is a no-op when CUDA is really available (the GPU tests run without the shim).
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


class _CpuTorch:
    """Stand-in for the `torch` module inside megatron's schedules.py: `device="cuda"` becomes CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs):
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def ones(self, *args, **kwargs):
        return torch.ones(*args, **self._cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def install_cpu_shim() -> None:
    """Patch torch.cuda and megatron-core so that they run on CPU (see module docstring)."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    def manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)
        mp_random.get_cuda_rng_tracker()  # make sure a tracker object exists for code that queries it

    def tracker_add(self, name, seed):
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = None

    @contextlib.contextmanager
    def tracker_fork(self, name=None):
        yield

    mp_random.model_parallel_cuda_manual_seed = manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = manual_seed
    mp_random.CudaRNGStatesTracker.add = tracker_add
    mp_random.CudaRNGStatesTracker.fork = tracker_fork

    schedules.torch = _CpuTorch()
    _INSTALLED = True
