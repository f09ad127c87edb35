"""Unified RoPE (docs/model.md §1): one rotary scheme for attention Q/K and SSM C/B, tables computed once per forward.

The model owns a `UnifiedRope`; every forward it builds a `RopeTables` from the position ids and hands the same
object to every layer of its pipeline stage (through HybridStack's `rotary_pos_emb` argument, see stack.py).
Attention rotates Q/K with `tables.attention`; the SS mixer passes `tables.state` to the SSD kernel, which
rotates B/C. When N equals the attention head dim both are the same tensors.

Tables hold half of the rotated dim (rotate_half pairing: dim i pairs with i + D/2, both turn by θ_i):
    cos, sin  (l, D/2) when positions are 0..l-1 for every row, else (b, l, D/2); always fp32.
They are recomputed from scratch each forward (a few microseconds) rather than cached as buffers, so that
bf16 wrapping of the model (megatron's Float16Module casts buffers) never lowers their precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

Table = tuple[torch.Tensor, torch.Tensor]  # (cos, sin)


@dataclass(frozen=True)
class RopeTables:
    """The rotary tables of one forward pass. `state` is None when SS layers do not use RoPE."""

    attention: Table
    state: Optional[Table]
    _state_casts: dict = field(default_factory=dict, compare=False, repr=False)

    def state_in(self, dtype: torch.dtype) -> Table:
        """`state` in `dtype`, cast once per forward for all the SS layers that read it (the SSD kernels read bf16
        tables with bf16 inputs)."""
        if self.state is None or self.state[0].dtype == dtype:
            return self.state
        if dtype not in self._state_casts:
            self._state_casts[dtype] = (self.state[0].to(dtype), self.state[1].to(dtype))
        return self._state_casts[dtype]


def rope_table(positions: torch.Tensor, dim: int, base: float) -> Table:
    """cos/sin of positions * θ_i, θ_i = base^(-2i/dim), i < dim/2. positions (...,) -> 2 x (..., dim/2) fp32."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # float64 angles: exact for long contexts
    return torch.cos(angles).float(), torch.sin(angles).float()


class UnifiedRope:
    """Builds the per-forward RopeTables for attention head dim `head_dim` and SSM state size `state_size`."""

    def __init__(self, head_dim: int, state_size: Optional[int], base: float = 10000.0):
        self.head_dim = head_dim
        self.state_size = state_size  # None: the SS layers are not rotated (or there are none)
        self.base = base

    def __call__(self, position_ids: Optional[torch.Tensor], seq_len: int, device) -> RopeTables:
        """position_ids (b, l) int or None (0..seq_len-1 for every row)."""
        if position_ids is None:
            positions = torch.arange(seq_len, device=device)
        else:
            if position_ids.dim() != 2 or position_ids.shape[1] != seq_len:
                raise ValueError(f"position_ids must have shape (b, {seq_len}), got {tuple(position_ids.shape)}")
            positions = position_ids.to(device)
        attention = rope_table(positions, self.head_dim, self.base)
        if self.state_size is None:
            state = None
        elif self.state_size == self.head_dim:
            state = attention  # same table, shared (docs/model.md §1)
        else:
            state = rope_table(positions, self.state_size, self.base)
        return RopeTables(attention=attention, state=state)

