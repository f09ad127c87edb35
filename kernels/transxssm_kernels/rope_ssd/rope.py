"""Rotary embedding of the SSM B and C (Unified RoPE, docs/model.md §1).

rotate_half pairing (GPT-NeoX, non-interleaved) over the last dim N: the first half a pairs with the second half b,

    a' = a * cos - b * sin
    b' = b * cos + a * sin

Shapes:
    t        (b, l, G, N)
    cos, sin (l, N//2) or (b, l, N//2), usually fp32
    returns  (b, l, G, N) in torch.promote_types(t.dtype, cos.dtype): a bf16 B rotated with fp32 tables comes out fp32,
             which is what the fp32 state math wants.
"""

import torch


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dim (GPT-NeoX pairing)."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate t (b, l, G, N) by the half-size tables cos/sin ((l, N//2) or (b, l, N//2))."""
    if t.dim() != 4:
        raise ValueError(f"apply_rope: expected t of shape (b, l, G, N), got {tuple(t.shape)}")
    b, l, _, n = t.shape
    if n % 2:
        raise ValueError(f"apply_rope: the rotated dim N must be even, got N={n}")
    for name, table in (("rope_cos", cos), ("rope_sin", sin)):
        if tuple(table.shape) not in ((l, n // 2), (b, l, n // 2)):
            raise ValueError(
                f"{name} must have shape (l, N//2)=({l}, {n // 2}) or (b, l, N//2)=({b}, {l}, {n // 2}); "
                f"got {tuple(table.shape)}"
            )
    dtype = torch.promote_types(t.dtype, cos.dtype)
    # Tables hold half of N; both halves of a pair turn by the same angle. Insert the group dim for broadcasting.
    cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(-2)
    sin = torch.cat((sin, sin), dim=-1).to(dtype).unsqueeze(-2)
    t = t.to(dtype)
    return t * cos + rotate_half(t) * sin
