"""Triton helpers shared by the forward and backward RoPE-SSD kernels.

B and C are rotated as they are loaded and never written back rotated. With rotate_half pairing, column n of the
first half pairs with column n + N/2, so every kernel keeps a rotated (rows x N) tile as two (rows x N/2) halves,
`lo` and `hi`; a dot product over N is the sum of the dots over the two halves. No shuffles are needed.
"""

import triton
import triton.language as tl


@triton.jit
def load_rotated(base, rows, row_mask, stride_row, stride_n, cos_base, sin_base, stride_cos_row,
                 half, half_mask, N_HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Load a (rows x N) tile of B or C as fp32 halves (lo, hi), rotated by the tables at positions `rows`.

    a' = a*cos - b*sin ; b' = b*cos + a*sin   (a = first half, b = second half).
    """
    m = row_mask[:, None] & half_mask[None, :]
    ptr = base + rows[:, None] * stride_row + half[None, :] * stride_n
    a = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    b = tl.load(ptr + N_HALF * stride_n, mask=m, other=0.0).to(tl.float32)
    if HAS_ROPE:
        tab = rows[:, None] * stride_cos_row + half[None, :]
        cos = tl.load(cos_base + tab, mask=m, other=1.0)
        sin = tl.load(sin_base + tab, mask=m, other=0.0)
        return a * cos - b * sin, b * cos + a * sin
    else:
        return a, b


@triton.jit
def unrotate(d_lo, d_hi, rows, row_mask, cos_base, sin_base, stride_cos_row, half, half_mask,
             HAS_ROPE: tl.constexpr):
    """Gradient through the rotation: the inverse rotation (angle -theta) of the halves (d_lo, d_hi)."""
    if HAS_ROPE:
        m = row_mask[:, None] & half_mask[None, :]
        tab = rows[:, None] * stride_cos_row + half[None, :]
        cos = tl.load(cos_base + tab, mask=m, other=1.0)
        sin = tl.load(sin_base + tab, mask=m, other=0.0)
        return d_lo * cos + d_hi * sin, d_hi * cos - d_lo * sin
    else:
        return d_lo, d_hi
