"""RMSNorm computed in fp32 (SPEC §4), and the grouped variant used by the SS mixer's gated output norm.

Torch-native on purpose: megatron's TENorm needs Transformer Engine, which neither our CPU CI nor the GPU
machine has. Weights are plain replicated parameters (no weight decay: `no_weight_decay = True`).
"""

from __future__ import annotations

import torch


def param_device(config):
    """Where megatron creates parameters: the current CUDA device, unless `use_cpu_initialization` (or no CUDA),
    then the default device (CPU, or meta inside `with torch.device("meta")`)."""
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x (..., C) normalised over the last dim (or over consecutive groups of `group_size` channels), in fp32,
    scaled by weight (C,), returned in x's dtype."""
    shape = x.shape
    xf = x.float()
    if group_size is not None:
        xf = xf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf.reshape(shape) * weight.float()).to(x.dtype)


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
