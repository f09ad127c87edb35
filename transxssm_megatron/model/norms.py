"""The RMSNorm module (docs/model.md §4): fp32 math in `fused_ops.rms_norm`, fused on CUDA.

Torch-native on purpose: megatron's TENorm needs Transformer Engine, which neither our CPU CI nor the GPU
machine has. Weights are plain replicated parameters (no weight decay: `no_weight_decay = True`).
"""

from __future__ import annotations

import torch

from .fused_ops import rms_norm


def param_device(config):
    """Where megatron creates parameters: the current CUDA device, unless `use_cpu_initialization` (or no CUDA),
    then the default device (CPU, or meta inside `with torch.device("meta")`)."""
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return None


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight over the hidden dim, fp32 math. `sequence_parallel` marks the weight so that
    megatron all-reduces its gradient over TP ranks (each rank then sees only part of the sequence)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.weight.no_weight_decay = True
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
