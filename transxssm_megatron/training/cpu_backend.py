"""CPU backend: lets megatron-core 0.19.2 run over gloo on a machine without CUDA (CPU training, the demo, tests, CI).

`install_cpu_backend()` is idempotent and a no-op when CUDA exists: training calls it only when it runs on the CPU
(parallel.setup), so nothing on a GPU depends on it; the tests call it too.

megatron-core is written for GPUs: a handful of modules create small bookkeeping tensors with a hard-coded
``device='cuda'`` (the fp32 optimizer's scale, the grad-norm all-reduce, the schedules' token counter, ...),
ask ``torch.cuda.current_device()`` for buffer placement, synchronize CUDA, and fork the CUDA RNG for
tensor-parallel regions. The shim redirects exactly those spots (one place, below):

1. In the listed megatron modules, the module-level name ``torch`` is replaced by a thin proxy whose factory
   functions (``tensor``, ``zeros``, ``empty``, ...) map a CUDA device argument to the CPU; everything else
   is the real ``torch``. Other code is untouched.
2. ``torch.cuda.current_device`` returns the CPU device, ``torch.cuda.synchronize`` is a no-op, the current
   stream is a null stream and ``Tensor.cuda()`` is the identity.
3. Gradient clipping's scale step (it asserts CUDA tensors) is replaced by the same arithmetic in plain
   PyTorch: grads *= max_norm / (total_norm + 1e-6) when that is below 1.
4. The tensor-parallel RNG tracker: ``model_parallel_cuda_manual_seed`` seeds the CPU generator, ``add`` only
   records the name and ``fork()`` is a no-op context (on CPU every rank of a TP group shares one generator
   stream; models are initialized on CPU with ``use_cpu_initialization=True``, so weights do not depend on it).
Pipeline runs over gloo also need ``TransformerConfig(batch_p2p_sync=False)`` (set by the caller).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

# Modules whose hard-coded CUDA literals we redirect (found by grep on megatron-core 0.19.2).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like", "ones_like")

_ENABLED = False


def _to_cpu_device(device):
    """Map any CUDA device spec ('cuda', 'cuda:0', torch.device('cuda'), int index) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorch(types.ModuleType):
    """`torch`, except that the tensor factories put CUDA-placed tensors on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, _fn=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return _fn(*args, **kwargs)
            return factory
        return attr


class _NullStream:
    """Stands in for the current CUDA stream: ordering is trivially satisfied on the CPU."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def install_cpu_backend() -> None:
    """Redirect megatron-core's CUDA-only bookkeeping to the CPU (see the module docstring). Idempotent."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    proxy = _CpuTorch()
    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core.optimizer import clip_grads, optimizer as megatron_optimizer

    @torch.no_grad()
    def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        coeff = max_norm / (float(total_norm) + 1.0e-6)
        if coeff < 1.0:
            for param in parameters:
                grad = getattr(param, attr, None)
                if grad is not None:
                    grad.mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu

    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    def cpu_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)

    tp_random.model_parallel_cuda_manual_seed = cpu_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = cpu_manual_seed
    def tracker_add(self, name, seed):  # there is no CUDA generator state to record
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = None

    tp_random.CudaRNGStatesTracker.add = tracker_add
    tp_random.CudaRNGStatesTracker.fork = lambda self, *args, **kwargs: contextlib.nullcontext()
    _ENABLED = True
