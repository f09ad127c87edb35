"""Forward Triton kernels of the chunked SSD with Unified RoPE (see chunk.py for the math and the shapes).

Two launches (three with the chunk-parallel state recurrence, _states.py; chunk_output_tma_kernel stands in for
chunk_output_kernel when B and C are rotated in place, chunk.py):
  1. `state_scan_fwd_kernel` grid (b*H, column blocks of N/2): walks the chunks in order with the state in
                            registers, storing the state entering each chunk (kept for the backward), then
                            h <- exp(cs_last) h + S_c,  S_c = sum_s delta_s exp(cs_last - cs_s) x_s B~_s^T  (P x N).
  2. `chunk_output_kernel`  grid (chunks * row blocks, b*H): y_t = exp(cs_t) C~_t h_c^T
                            + sum_{s<=t} exp(cs_t - cs_s) (C~_t . B~_s) delta_s x_s.
cs is the within-chunk cumulative sum of delta*A, laid out (b, H, Lp) with Lp = chunks * Q (zero-padded delta).
"""

import triton
import triton.language as tl

from ._triton_common import (diagonal_decay, entering_state_weight, exp_ftz, load_rotated, load_scan_state,
                             load_state_halves, pin, prefetch_block, scan_program, store_halves, store_scan_state,
                             tile_program, valid)


@triton.jit
def add_block_outer(acc_lo, acc_hi, vec_base, s_vl, s_vp, mat_base, s_ml, s_mn, cos_base, sin_base, s_cl,
                    delta_base, cs_base, seq_base, start, s0, L, P, half, mask_h,
                    N_HALF: tl.constexpr, Q: tl.constexpr, BS: tl.constexpr, BLOCK_P: tl.constexpr,
                    MODE: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
                    STORE_ROTATED: tl.constexpr = False):
    """(acc_lo, acc_hi) + one row block's part of a chunk's  sum_s w_s v_s M~_s^T  (halves, P x the columns `half`):
    rows start + s0 .. + BS of the chunk starting at `start`. STORE_ROTATED writes M~ over M's rows (the caller's
    program is the only one to read them).

    MODE 0 (forward):  v = x, M = B, w_s = delta_s exp(cs_last - cs_s) [same document as the chunk's last token]
    MODE 1 (backward): v = g, M = C, w_t = exp(cs_t) [same document as the token before the chunk]
    """
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    rows = start + s0 + tl.arange(0, BS)
    rmask = rows < L
    cs = tl.load(cs_base + rows)
    if MODE == 0:
        w = tl.load(delta_base + rows) * tl.exp(tl.load(cs_base + start + Q - 1) - cs)
        seq_row = tl.minimum(start + Q, L) - 1
    else:
        w = tl.exp(cs)
        seq_row = tl.maximum(start - 1, 0)
    if HAS_SEQ:
        sq = tl.load(seq_base + rows, mask=rmask, other=-1)
        w = tl.where(sq == tl.load(seq_base + seq_row), w, 0.0)
    w = tl.where(rmask, w, 0.0)
    v = tl.load(vec_base + rows[:, None] * s_vl + offs_p[None, :] * s_vp,
                mask=rmask[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    lo, hi = load_rotated(mat_base, rows, rmask, s_ml, s_mn, cos_base, sin_base, s_cl, half, mask_h,
                          N_HALF, HAS_ROPE)
    if STORE_ROTATED:
        store_halves(mat_base, rows, rmask, s_ml, s_mn, half, mask_h, lo, hi, N_HALF)
    vwt = tl.trans((v * w[:, None]).to(DOT))
    return tl.dot(vwt, lo.to(DOT), acc_lo), tl.dot(vwt, hi.to(DOT), acc_hi)


@triton.jit
def chunk_decay(cs_base, seq_base, c, L, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """exp(sum of delta*A over chunk c), or 0 when a document starts inside (or at the start of) the chunk."""
    decay = tl.exp(tl.load(cs_base + c * Q + Q - 1))
    if HAS_SEQ:
        last = tl.minimum(c * Q + Q, L) - 1
        prev = tl.maximum(c * Q - 1, 0)
        decay = tl.where(tl.load(seq_base + last) == tl.load(seq_base + prev), decay, 0.0)
    return decay


@triton.jit
def state_scan_fwd_kernel(
    x_ptr, s_xb, s_xl, s_xh, s_xp,            # (b, l, H, P)
    b_ptr, s_bb, s_bl, s_bg, s_bn,            # B (b, l, G, N)
    cos_ptr, sin_ptr, s_tb, s_tl,             # (b?, l, N/2) fp32, last dim contiguous
    delta_ptr, cs_ptr,                        # (b, H, Lp) fp32 contiguous
    seq_ptr,                                  # (b, l) int32 contiguous
    init_ptr,                                 # (b, H, P, N) fp32
    states_ptr,                               # out (b, H, NC, P, N): the state entering each chunk (fp32 / input)
    final_ptr,                                # out (b, H, P, N) fp32
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BS: tl.constexpr, BLOCK_P: tl.constexpr, BNH: tl.constexpr,
    BLOCK_NH: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, DOT: tl.constexpr,
):
    """Walk the chunks of one (batch row, head) in order with the state (P x the program's columns) in registers:
    store the state entering chunk c, then h <- decay_c h + S_c. Grid (b*H, N/2 / BNH)."""
    b64, hi_, gi, bh64, half, mask_h, st_off, st_mask = scan_program(H, HPG, P, N_HALF, BLOCK_P, BNH)
    N = 2 * N_HALF

    x_base = x_ptr + b64 * s_xb + hi_ * s_xh
    bm_base = b_ptr + b64 * s_bb + gi * s_bg
    cos_base = cos_ptr + b64 * s_tb
    sin_base = sin_ptr + b64 * s_tb
    delta_base = delta_ptr + bh64 * Lp
    cs_base = cs_ptr + bh64 * Lp
    seq_base = seq_ptr + b64 * L
    PN = P * N
    if HAS_INIT:
        h_lo, h_hi = load_scan_state(init_ptr + bh64 * PN, st_off, st_mask, N_HALF)
    else:
        h_lo = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
        h_hi = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
    st_base = states_ptr + bh64 * NC * PN
    # one loop over every row block of the sequence (not chunks, then blocks) so that the loads stay pipelined
    # across chunk boundaries; at a chunk's first block the state entering it is stored and decayed, then every
    # block's terms accumulate into it
    NB: tl.constexpr = Q // BS
    for i in range(NC * NB):
        c = i // NB
        if i % NB == 0:
            store_scan_state(st_base + c * PN, h_lo, h_hi, st_off, st_mask, N_HALF)
            decay = chunk_decay(cs_base, seq_base, c, L, Q, HAS_SEQ)
            h_lo = decay * h_lo
            h_hi = decay * h_hi
        h_lo, h_hi = add_block_outer(h_lo, h_hi, x_base, s_xl, s_xp, bm_base, s_bl, s_bn, cos_base, sin_base, s_tl,
                                     delta_base, cs_base, seq_base, c * Q, (i % NB) * BS, L, P, half, mask_h,
                                     N_HALF, Q, BS, BLOCK_P, 0, HAS_ROPE, HAS_SEQ, DOT)
    store_scan_state(final_ptr + bh64 * PN, h_lo, h_hi, st_off, st_mask, N_HALF)


@triton.jit
def source_scores(c_lo, c_hi, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base, sin_base, s_tl, half, mask_h,
                  x_base, s_xl, s_xp, offs_p, mask_p, delta_base, cs_base, N_HALF: tl.constexpr,
                  HAS_ROPE: tl.constexpr, DOT: tl.constexpr):
    """For source rows `rows_s`: the scores C~_t . B~_s (fp32), x_s, delta_s and cs_s."""
    b_lo, b_hi = load_rotated(bm_base, rows_s, smask_r, s_bl, s_bn, cos_base, sin_base, s_tl, half, mask_h,
                              N_HALF, HAS_ROPE)
    xs = tl.load(x_base + rows_s[:, None] * s_xl + offs_p[None, :] * s_xp, mask=smask_r[:, None] & mask_p[None, :],
                 other=0.0)
    scores = tl.dot(c_lo, tl.trans(b_lo.to(DOT))) + tl.dot(c_hi, tl.trans(b_hi.to(DOT)))
    return scores, xs, tl.load(delta_base + rows_s), tl.load(cs_base + rows_s)


@triton.jit
def chunk_output_kernel(
    x_ptr, s_xb, s_xl, s_xh, s_xp,            # (b, l, H, P)
    b_ptr, s_bb, s_bl, s_bg, s_bn,            # B (b, l, G, N)
    c_ptr, s_cb_, s_cl_, s_cg, s_cn,          # C (b, l, G, N)
    cos_ptr, sin_ptr, s_tb, s_tl,             # tables
    delta_ptr, cs_ptr, seq_ptr,
    states_ptr,                               # (b, H, NC, P, N): state entering each chunk
    y_ptr, s_yb, s_yl, s_yh, s_yp,            # (b, l, H, P)
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_NH: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr, EVEN: tl.constexpr,
):
    c, tb, b64, hi_, gi, bh64 = tile_program(H, HPG, Q, BT)
    dot_dtype = DOT

    offs_p = tl.arange(0, BLOCK_P)
    mask_p = valid(offs_p, P, EVEN)
    half = tl.arange(0, BLOCK_NH)
    mask_h = valid(half, N_HALF, EVEN)
    N = 2 * N_HALF

    start = c * Q
    rows_t = start + tb * BT + tl.arange(0, BT)
    tmask = valid(rows_t, L, EVEN)
    cs_base = cs_ptr + bh64 * Lp
    delta_base = delta_ptr + bh64 * Lp
    cos_base = cos_ptr + b64 * s_tb
    sin_base = sin_ptr + b64 * s_tb
    x_base = x_ptr + b64 * s_xb + hi_ * s_xh
    bm_base = b_ptr + b64 * s_bb + gi * s_bg
    cm_base = c_ptr + b64 * s_cb_ + gi * s_cg

    prefetch_block(bm_base, s_bl, s_bn, cos_base, sin_base, s_tl, x_base, s_xl, start + tl.arange(0, BI), L, N_HALF,
                   HAS_ROPE)
    cs_t = tl.load(cs_base + rows_t)
    c_lo, c_hi = load_rotated(cm_base, rows_t, tmask, s_cl_, s_cn, cos_base, sin_base, s_tl, half, mask_h,
                              N_HALF, HAS_ROPE)
    c_lo = pin(c_lo.to(dot_dtype))
    c_hi = pin(c_hi.to(dot_dtype))
    w_t, seq_t = entering_state_weight(cs_t, seq_ptr + b64 * L, rows_t, tmask, start, HAS_SEQ)

    # source blocks before the target block: the decay splits at the pivot (_triton_common)
    pivot = tl.where(tb > 0, tl.load(cs_base + tl.maximum(start + tb * BT - 1, 0)), 0.0)
    acc = tl.zeros((BT, BLOCK_P), dtype=tl.float32)
    for s0 in range(0, tb * BT, BI):
        rows_s = start + s0 + tl.arange(0, BI)
        prefetch_block(bm_base, s_bl, s_bn, cos_base, sin_base, s_tl, x_base, s_xl, rows_s + BI, L, N_HALF, HAS_ROPE)
        smask_r = valid(rows_s, L, EVEN)
        scores, xs, d_s, cs_s = source_scores(c_lo, c_hi, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base,
                                              sin_base, s_tl, half, mask_h, x_base, s_xl, s_xp, offs_p, mask_p,
                                              delta_base, cs_base, N_HALF, HAS_ROPE, dot_dtype)
        e_s = exp_ftz(pivot - cs_s)
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b64 * L + rows_s, mask=smask_r, other=-2)
            scores = tl.where(seq_t[:, None] == seq_s[None, :], scores, 0.0)
        acc += tl.dot((scores * (e_s * d_s)[None, :]).to(dot_dtype), xs.to(dot_dtype))
    acc = acc * exp_ftz(cs_t - pivot)[:, None]

    # contribution of the state entering the chunk
    h_lo, h_hi = load_state_halves(states_ptr + (bh64 * NC + c) * P * N, offs_p, mask_p, half, mask_h, N_HALF,
                                   dot_dtype)
    acc += (tl.dot(c_lo, tl.trans(h_lo)) + tl.dot(c_hi, tl.trans(h_hi))) * w_t[:, None]

    # the diagonal block, causal
    for s0 in range(tb * BT, tb * BT + BT, BI):
        rows_s = start + s0 + tl.arange(0, BI)
        if BI < BT:
            prefetch_block(bm_base, s_bl, s_bn, cos_base, sin_base, s_tl, x_base, s_xl, rows_s + BI, L, N_HALF,
                           HAS_ROPE)
        smask_r = valid(rows_s, L, EVEN)
        scores, xs, d_s, cs_s = source_scores(c_lo, c_hi, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base,
                                              sin_base, s_tl, half, mask_h, x_base, s_xl, s_xp, offs_p, mask_p,
                                              delta_base, cs_base, N_HALF, HAS_ROPE, dot_dtype)
        keep = tl.arange(0, BT)[:, None] >= (s0 - tb * BT) + tl.arange(0, BI)[None, :]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b64 * L + rows_s, mask=smask_r, other=-2)
            keep = keep & (seq_t[:, None] == seq_s[None, :])
        scores = scores * diagonal_decay(cs_t[:, None], cs_s[None, :], keep) * d_s[None, :]
        acc += tl.dot(scores.to(dot_dtype), xs.to(dot_dtype))

    yptr = y_ptr + b64 * s_yb + hi_ * s_yh + rows_t[:, None] * s_yl + offs_p[None, :] * s_yp
    tl.store(yptr, acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & mask_p[None, :])


@triton.jit
def chunk_output_tma_kernel(
    x_desc, x_rb, x_cb, s_xh,                 # x, B~: 2-D descriptors, (position, batch) at row position + batch * rb,
    b_desc, b_rb, b_cb, s_bg,                 # column batch * cb (+ head * s_xh or group * s_bg)
    c_ptr, s_cb_, s_cl_, s_cg, s_cn,          # C (b, l, G, N): rotated here and written back rotated
    cos_ptr, sin_ptr, s_tb, s_tl,
    delta_ptr, cs_ptr, seq_ptr,
    states_ptr,                               # (b, H, NC, P, N): state entering each chunk
    y_ptr, s_yb, s_yl, s_yh, s_yp,            # (b, l, H, P)
    L, Lp, H, HPG, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT: tl.constexpr,
):
    """chunk_output_kernel where B already holds B~ (the chunk sums wrote it), for whole chunks and 16-bit operands
    with BT-row source blocks. The copy engine (TMA) loads each source block of B~ and x into shared memory,
    multi-buffered by Triton's pipeliner (num_stages), and B~ goes from there straight into the dot: with the
    rotation in the loop each block would pass through registers and back, and the copies would gain nothing. The
    target block is rotated here as it is loaded and written back as C~ for the backward kernels. Plain loads
    before the loop, in flight together (a descriptor load outside a loop is waited on at once), and no branch in
    the loop (loads used inside one stay unpipelined): the state's term starts the sum, weighted exp(pivot), and
    the sum is scaled by exp(cs_t - pivot) at the diagonal block, so every factor stays <= 1."""
    c, tb, b64, hi_, gi, bh64 = tile_program(H, HPG, Q, BT)
    bi = b64.to(tl.int32)
    start = c * Q
    t0 = start + tb * BT
    rows_t = t0 + tl.arange(0, BT)
    all_rows = rows_t < L
    half = tl.arange(0, N_HALF)
    offs_p = tl.arange(0, BLOCK_P)
    cs_base = cs_ptr + bh64 * Lp
    delta_base = delta_ptr + bh64 * Lp
    cm_base = c_ptr + b64 * s_cb_ + gi * s_cg
    cs_t = tl.load(cs_base + rows_t)
    c_lo, c_hi = load_rotated(cm_base, rows_t, all_rows, s_cl_, s_cn, cos_ptr + b64 * s_tb, sin_ptr + b64 * s_tb,
                              s_tl, half, half < N_HALF, N_HALF, True)
    h_lo, h_hi = load_state_halves(states_ptr + (bh64 * NC + c) * BLOCK_P * 2 * N_HALF, offs_p, offs_p < BLOCK_P,
                                   half, half < N_HALF, N_HALF, DOT)
    pivot = tl.where(tb > 0, tl.load(cs_base + tl.maximum(t0 - 1, 0)), 0.0)
    store_halves(cm_base, rows_t, all_rows, s_cl_, s_cn, half, half < N_HALF, c_lo, c_hi, N_HALF)
    c_lo = pin(c_lo.to(DOT))
    c_hi = pin(c_hi.to(DOT))
    w0, seq_t = entering_state_weight(tl.full((BT,), 0.0, tl.float32) + pivot, seq_ptr + b64 * L, rows_t,
                                      all_rows, start, HAS_SEQ)
    acc = (tl.dot(c_lo, tl.trans(h_lo)) + tl.dot(c_hi, tl.trans(h_hi))) * w0[:, None]
    b_col = bi * b_cb + gi * s_bg
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    for sb in range(0, tb + 1):
        s0 = start + sb * BT
        b_lo = b_desc.load([s0 + bi * b_rb, b_col])
        b_hi = b_desc.load([s0 + bi * b_rb, b_col + N_HALF])
        xs = x_desc.load([s0 + bi * x_rb, bi * x_cb + hi_ * s_xh])
        d_s = tl.load(delta_base + s0 + tl.arange(0, BT))
        cs_s = tl.load(cs_base + s0 + tl.arange(0, BT))
        scores = tl.dot(c_lo, tl.trans(b_lo.to(DOT))) + tl.dot(c_hi, tl.trans(b_hi.to(DOT)))
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b64 * L + s0 + tl.arange(0, BT))
            scores = tl.where(seq_t[:, None] == seq_s[None, :], scores, 0.0)
        diagonal = sb == tb
        decay = tl.where(diagonal, diagonal_decay(cs_t[:, None], cs_s[None, :], causal),
                         exp_ftz(pivot - cs_s)[None, :])
        acc = acc * tl.where(diagonal, exp_ftz(cs_t - pivot), 1.0)[:, None]
        acc += tl.dot((scores * decay * d_s[None, :]).to(DOT), xs.to(DOT))

    yptr = y_ptr + b64 * s_yb + hi_ * s_yh + rows_t[:, None] * s_yl + offs_p[None, :] * s_yp
    tl.store(yptr, acc.to(y_ptr.dtype.element_ty))
