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


@triton.jit
def to_dot(x, DOT: tl.constexpr, TF32: tl.constexpr):
    """x as a dot operand of type DOT. With TF32 (fp32 inputs on a GPU, where fp32 dots run as tf32) the value is
    rounded to tf32's 10-bit mantissa here, so that a product formed outside a dot from the same operand (the d(delta
    A) row sums) equals the one inside it; the dot then drops no bits."""
    if TF32:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x.to(DOT)


@triton.jit
def tile_program(H, HPG, Q: tl.constexpr, BT: tl.constexpr):
    """Where a tile-kernel program works, grid (chunks * Q/BT, b*H): (chunk, row block in it, batch row, head,
    B/C group, batch*H + head); the batch row and that index as int64 for pointer offsets."""
    pid_rows = tl.program_id(0)
    pid_bh = tl.program_id(1)
    head = pid_bh % H
    return (pid_rows // (Q // BT), pid_rows % (Q // BT), (pid_bh // H).to(tl.int64), head, head // HPG,
            pid_bh.to(tl.int64))


@triton.jit
def load_state_halves(base, offs_p, mask_p, half, mask_h, N_HALF: tl.constexpr, DOT: tl.constexpr):
    """A (P x N) fp32 state (or its gradient) at `base` as two (P x N/2) halves in the dot dtype."""
    ptr = base + offs_p[:, None] * (2 * N_HALF) + half[None, :]
    m = mask_p[:, None] & mask_h[None, :]
    return tl.load(ptr, mask=m, other=0.0).to(DOT), tl.load(ptr + N_HALF, mask=m, other=0.0).to(DOT)


@triton.jit
def entering_state_weight(cs_t, seq_base, rows_t, tmask, start, HAS_SEQ: tl.constexpr):
    """exp(cs_t), the weight of the state entering the chunk in y_t, zero for tokens of a document that starts
    inside the chunk; and the document ids of rows_t (rows_t itself without documents, unused then)."""
    w_t = tl.exp(cs_t)
    seq_t = rows_t
    if HAS_SEQ:
        seq_t = tl.load(seq_base + rows_t, mask=tmask, other=-1)
        w_t = tl.where(seq_t == tl.load(seq_base + tl.maximum(start - 1, 0)), w_t, 0.0)
    return w_t, seq_t


@triton.jit
def scan_program(H, HPG, P, N_HALF: tl.constexpr, BLOCK_P: tl.constexpr, BNH: tl.constexpr):
    """Where a state-scan program works, grid (b*H, N/2 / BNH): (batch row as int64, head, B/C group, batch*H + head
    as int64, its half-columns and their mask, offsets and mask of its (P x columns) part of a (P x N) state)."""
    pid_bh = tl.program_id(0)
    head = pid_bh % H
    offs_p = tl.arange(0, BLOCK_P)
    half = tl.program_id(1) * BNH + tl.arange(0, BNH)
    mask_h = half < N_HALF
    st_off = offs_p[:, None] * (2 * N_HALF) + half[None, :]
    st_mask = (offs_p < P)[:, None] & mask_h[None, :]
    return (pid_bh // H).to(tl.int64), head, head // HPG, pid_bh.to(tl.int64), half, mask_h, st_off, st_mask
