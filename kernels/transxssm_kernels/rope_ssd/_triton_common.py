"""Triton helpers shared by the forward and backward RoPE-SSD kernels.

B and C are rotated as they are loaded and never written back rotated. With rotate_half pairing, column n of the
first half pairs with column n + N/2, so every kernel keeps a rotated (rows x N) tile as two (rows x N/2) halves,
`lo` and `hi`; a dot product over N is the sum of the dots over the two halves. No shuffles are needed.

Decays in the tile kernels. On the chunk's diagonal row block the decay exp(cs_t - cs_s) is a masked tile of
exponentials (diagonal_decay). Off it every source s precedes every target t, so with the pivot m = cs at the row
just before the target block, exp(cs_t - cs_s) = exp(cs_t - m) exp(m - cs_s): two vectors of factors <= 1 (no
overflow; an underflowing factor means a decay below 2^-126) instead of BT x BI exponentials, masks and compares.
dc and dxdb form the same products from the same pivot, in the same order, so their d(delta A) sums agree.
"""

import os

import triton
import triton.language as tl

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# bf16 rotation in packed bf16x2 PTX (GPU only; the interpreter rotates in fp32). TRANSXSSM_SSD_FP32_ROTATION=1 rotates
# bf16 in fp32 on the GPU too (slower; for comparing numerics).
PACKED_ROTATION = tl.constexpr(not _INTERPRET and os.environ.get("TRANSXSSM_SSD_FP32_ROTATION", "0") != "1")


@triton.jit
def load_rotated(base, rows, row_mask, stride_row, stride_n, cos_base, sin_base, stride_cos_row,
                 half, half_mask, N_HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Load a (rows x N) tile of B or C as halves (lo, hi), rotated by the tables at positions `rows`.

    a' = a*cos - b*sin ; b' = b*cos + a*sin   (a = first half, b = second half).
    bf16 B / C with bf16 tables rotate in packed bf16x2 arithmetic (rotate_bf16x2) and give bf16 halves; everything
    else rotates in fp32 and gives fp32 halves.
    """
    m = row_mask[:, None] & half_mask[None, :]
    ptr = base + rows[:, None] * stride_row + half[None, :] * stride_n
    a = tl.load(ptr, mask=m, other=0.0)
    b = tl.load(ptr + N_HALF * stride_n, mask=m, other=0.0)
    if HAS_ROPE:
        tab = rows[:, None] * stride_cos_row + half[None, :]
        cos = tl.load(cos_base + tab, mask=m, other=1.0)
        sin = tl.load(sin_base + tab, mask=m, other=0.0)
        if PACKED_ROTATION and a.dtype == tl.bfloat16 and cos.dtype == tl.bfloat16:
            lo, hi = rotate_bf16x2(a, b, cos, sin)
        else:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            cos = cos.to(tl.float32)
            sin = sin.to(tl.float32)
            lo, hi = a * cos - b * sin, b * cos + a * sin
    else:
        lo, hi = a.to(tl.float32), b.to(tl.float32)
    return lo, hi


@triton.jit
def store_halves(base, rows, row_mask, stride_row, stride_n, half, half_mask, lo, hi, N_HALF: tl.constexpr):
    """Store the halves (lo, hi) of a (rows x N) tile of B or C (in the tensor's dtype), as load_rotated reads it."""
    m = row_mask[:, None] & half_mask[None, :]
    ptr = base + rows[:, None] * stride_row + half[None, :] * stride_n
    tl.store(ptr, lo.to(base.dtype.element_ty), mask=m)
    tl.store(ptr + N_HALF * stride_n, hi.to(base.dtype.element_ty), mask=m)


@triton.jit
def pin(x):
    """x unchanged, through an opaque register move that Triton's layout pass cannot duplicate: a rotated tile used as
    a dot's register operand is then converted once per half, instead of each of its four raw inputs being staged
    through shared memory in turn (one load, store, barrier and reload after another) and the rotation recomputed
    per layout. A no-op in the interpreter."""
    if _INTERPRET:
        return x
    if x.dtype.primitive_bitwidth == 16:   # two elements per 32-bit register
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)


@triton.jit
def prefetch_block(mat_base, stride_row, stride_n, cos_base, sin_base, stride_cos_row, vec_base, stride_vec_row,
                   rows, L, N_HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Ask L1 for the first line of each row of a block of B or C (both halves), of its tables and of x (or g), a
    block ahead of the loads: the tile kernels' main stall is waiting on those loads (ncu), and holding the next
    block in registers instead spills. chunk_output uses it (0.05 ms faster on the H200); in dc and dxdb it measured
    slower (docs/kernels.md). The rows are clamped to the sequence; a no-op in the interpreter."""
    if not _INTERPRET:
        r = tl.minimum(rows, L - 1)
        prefetch_l1(mat_base + r * stride_row)
        prefetch_l1(mat_base + r * stride_row + N_HALF * stride_n)
        prefetch_l1(vec_base + r * stride_vec_row)
        if HAS_ROPE:
            prefetch_l1(cos_base + r * stride_cos_row)
            prefetch_l1(sin_base + r * stride_cos_row)


@triton.jit
def prefetch_l1(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def rotate_bf16x2(a, b, cos, sin):
    """The rotation on bf16 pairs packed in 32-bit registers: two products and two fused multiply-adds per pair of
    elements, no conversions to and from fp32. Written as PTX so that every kernel rounds it the same way (the
    d(delta A) sums need the B~ and C~ of dc, dxdb and the scans to agree bit for bit)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 p, q, nb; mul.rn.bf16x2 p, $2, $4; mul.rn.bf16x2 q, $3, $4; neg.bf16x2 nb, $3; "
        "fma.rn.bf16x2 $0, nb, $5, p; fma.rn.bf16x2 $1, $2, $5, q; }",
        "=r,=r,r,r,r,r", [a, b, cos, sin], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


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
def valid(offs, limit, EVEN: tl.constexpr):
    """offs < limit; a constant all-true mask when the launch guarantees it (EVEN: whole chunks, unpadded P and N),
    so that the loads and stores of the tile kernels lose their masks, compares and fill values."""
    if EVEN:
        return tl.full(offs.shape, 1, tl.int1)
    return offs < limit


@triton.jit
def exp_ftz(x):
    """exp(x) as a single ex2.approx.ftz: results below 2^-126 flush to zero (decays that small are zero anyway).
    tl.exp's default lowering adds a range test and two multiplies per element to keep them subnormal."""
    if _INTERPRET:
        return tl.exp(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def diagonal_decay(cs_later, cs_earlier, keep):
    """exp(cs_t - cs_s) where `keep` (t >= s, same document), else 0; for the tiles on the chunk's diagonal."""
    return tl.where(keep, exp_ftz(tl.minimum(cs_later - cs_earlier, 0.0)), 0.0)


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
def load_scan_state(base, st_off, st_mask, N_HALF: tl.constexpr):
    """A state scan's (P x columns) halves of the (P x N) state (or gradient) at `base`, as fp32."""
    return (tl.load(base + st_off, mask=st_mask, other=0.0).to(tl.float32),
            tl.load(base + st_off + N_HALF, mask=st_mask, other=0.0).to(tl.float32))


@triton.jit
def store_scan_state(base, lo, hi, st_off, st_mask, N_HALF: tl.constexpr):
    """Store a state scan's (P x columns) halves of a (P x N) state at `base`, in the buffer's dtype."""
    tl.store(base + st_off, lo.to(base.dtype.element_ty), mask=st_mask)
    tl.store(base + st_off + N_HALF, hi.to(base.dtype.element_ty), mask=st_mask)


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
