"""Backward Triton kernels of the chunked SSD with Unified RoPE (see chunk.py for the derivation).

g is the gradient of y; u_s = delta_s x_s; L_ts = exp(cs_t - cs_s) for s <= t in the same chunk (and document);
a_j = delta_j A (cs is its within-chunk cumulative sum).
  1. state_scan_bwd_kernel: reverse walk, dH_c = sum_t exp(cs_t) g_t C~_t^T + decay_c dH_{c+1}; stores the gradient
     of the state leaving each chunk and K_c = decay_c <dH_{c+1}, H_c>.
  2. dc_kernel   (t rows):  dC~_t = exp(cs_t) g_t H_c + sum_s L_ts (g_t.u_s) B~_s ;  E_t = C~_t . dC~_t
  3. dxdb_kernel (s rows):  du_s = w_s dH_{c+1} B~_s + sum_t L_ts (C~_t.B~_s) g_t ;
                            dB~_s = w_s dH_{c+1}^T u_s + sum_t L_ts (g_t.u_s) C~_t ;  w_s = exp(cs_last - cs_s)
     then dx = delta du, d delta (direct) = du.x, V_s = u_s . (state-path part of du_s), K_s = sum_t W_ts.
  d(delta*A): with W_ts = L_ts (g_t.u_s)(C~_t.B~_s), d cs_t (intra) = sum_s W_ts - K_t. The first sum is the intra
  part of E_t (its state part is g_t.y_off_t), so d cs_t (all) = E_t - K_t and d a_j = sum_{t >= j} (E_t - K_t)
  + sum_{s < j} V_s + K_c (chunk.py adds the parts up). dc needs no C~ B~^T for this: E_t is one row sum after its
  loop. dxdb forms K_s from the same dot-rounded L (u.g) that dc's dots use (fp32 operands rounded to tf32 by
  to_dot), so the diagonal twins W_tt of E_t and K_t cancel to fp32 rounding. Forming d cs_t = g_t.y_t - u_t.du_t
  instead would subtract bf16-rounded outputs, whose twins no longer cancel, and lose dA.
Rotated gradients go back through the inverse rotation as they are stored (UNROTATE). HAS_ROPE rotates B and C as
they are loaded; where the forward rotated them in place (chunk.py) it is off and UNROTATE on.
"""

import triton
import triton.language as tl

from ._fwd import add_block_outer, chunk_decay
from ._triton_common import (diagonal_decay, entering_state_weight, exp_ftz, load_rotated, load_scan_state,
                             load_state_halves, pin, scan_program, store_halves, store_scan_state, tile_program,
                             to_dot, unrotate, valid)


@triton.jit
def state_scan_bwd_kernel(
    g_ptr, s_gb, s_gl, s_gh, s_gp,            # (b, l, H, P), gradient of y
    c_ptr, s_cb_, s_cl_, s_cg, s_cn,          # C (b, l, G, N)
    cos_ptr, sin_ptr, s_tb, s_tl,
    cs_ptr, seq_ptr,
    states_ptr,                               # (b, H, NC, P, N) state entering each chunk (forward)
    dfinal_ptr,                               # (b, H, P, N) fp32
    dstates_ptr,                              # out (b, H, NC, P, N): gradient of the state leaving each chunk
    dinit_ptr,                                # out (b, H, P, N)
    kdec_ptr,                                 # (b, H, NC) fp32, zeroed: += decay_c <dH_{c+1}, H_c> (atomic)
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BS: tl.constexpr, BLOCK_P: tl.constexpr, BNH: tl.constexpr,
    BLOCK_NH: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, DOT: tl.constexpr,
):
    """Reverse walk over the chunks of one (batch row, head), columns block of N/2 in registers:
    dH_c = decay_c dH_{c+1} + sum_t exp(cs_t) g_t C~_t^T. Grid (b*H, N/2 / BNH)."""
    b64, hi_, gi, bh64, half, mask_h, st_off, st_mask = scan_program(H, HPG, P, N_HALF, BLOCK_P, BNH)
    N = 2 * N_HALF

    g_base = g_ptr + b64 * s_gb + hi_ * s_gh
    cm_base = c_ptr + b64 * s_cb_ + gi * s_cg
    cos_base = cos_ptr + b64 * s_tb
    sin_base = sin_ptr + b64 * s_tb
    cs_base = cs_ptr + bh64 * Lp
    seq_base = seq_ptr + b64 * L
    PN = P * N
    if HAS_DFINAL:
        r_lo, r_hi = load_scan_state(dfinal_ptr + bh64 * PN, st_off, st_mask, N_HALF)
    else:
        r_lo = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
        r_hi = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
    st_base = states_ptr + bh64 * NC * PN
    dst_base = dstates_ptr + bh64 * NC * PN
    # one loop over every row block, last chunk first (as the forward scan: pipelined across chunk boundaries); at
    # a chunk's first block the gradient of the state leaving it is stored, K_c formed and the gradient decayed
    NB: tl.constexpr = Q // BS
    for i in range(NC * NB):
        c = NC - 1 - i // NB
        if i % NB == 0:
            store_scan_state(dst_base + c * PN, r_lo, r_hi, st_off, st_mask, N_HALF)
            decay = chunk_decay(cs_base, seq_base, c, L, Q, HAS_SEQ)
            h_lo, h_hi = load_scan_state(st_base + c * PN, st_off, st_mask, N_HALF)
            tl.atomic_add(kdec_ptr + bh64 * NC + c, decay * tl.sum(tl.sum(r_lo * h_lo + r_hi * h_hi, 1), 0))
            r_lo = decay * r_lo
            r_hi = decay * r_hi
        r_lo, r_hi = add_block_outer(r_lo, r_hi, g_base, s_gl, s_gp, cm_base, s_cl_, s_cn, cos_base, sin_base, s_tl,
                                     cs_base, cs_base, seq_base, c * Q, (i % NB) * BS, L, P, half, mask_h,
                                     N_HALF, Q, BS, BLOCK_P, 1, HAS_ROPE, HAS_SEQ, DOT)
    store_scan_state(dinit_ptr + bh64 * PN, r_lo, r_hi, st_off, st_mask, N_HALF)


@triton.jit
def source_gu(g, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base, sin_base, s_tl, half, mask_h, x_base, s_xl, s_xp,
              offs_p, mask_p, delta_base, cs_base, N_HALF: tl.constexpr, HAS_ROPE: tl.constexpr, DOT: tl.constexpr,
              TF32: tl.constexpr):
    """For source rows s of dc: the B~_s halves as dot operands, g_t . u_s (fp32; u = delta x rounded as a dot
    operand, as dxdb rounds it) and cs_s."""
    b_lo, b_hi = load_rotated(bm_base, rows_s, smask_r, s_bl, s_bn, cos_base, sin_base, s_tl, half, mask_h,
                              N_HALF, HAS_ROPE)
    xs = tl.load(x_base + rows_s[:, None] * s_xl + offs_p[None, :] * s_xp, mask=smask_r[:, None] & mask_p[None, :],
                 other=0.0).to(tl.float32)
    u = to_dot(xs * tl.load(delta_base + rows_s)[:, None], DOT, TF32)
    return to_dot(b_lo, DOT, TF32), to_dot(b_hi, DOT, TF32), tl.dot(g, tl.trans(u)), tl.load(cs_base + rows_s)


@triton.jit
def dc_kernel(
    g_ptr, s_gb, s_gl, s_gh, s_gp,            # (b, l, H, P)
    x_ptr, s_xb, s_xl, s_xh, s_xp,
    b_ptr, s_bb, s_bl, s_bg, s_bn,
    c_ptr, s_cb_, s_cl_, s_cg, s_cn,
    cos_ptr, sin_ptr, s_tb, s_tl,
    delta_ptr, cs_ptr, seq_ptr,
    states_ptr,                               # (b, H, NC, P, N) state entering each chunk
    dc_ptr, s_db, s_dl, s_dh, s_dn,           # dC per head (b, l, H, N)
    e_ptr,                                    # out (b, H, Lp) fp32: E_t = C~_t . dC~_t
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_NH: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr, TF32: tl.constexpr, EVEN: tl.constexpr,
    UNROTATE: tl.constexpr,
):
    c, tb, b64, hi_, gi, bh64 = tile_program(H, HPG, Q, BT)

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

    cs_t = tl.load(cs_base + rows_t)
    g = to_dot(tl.load(g_ptr + b64 * s_gb + hi_ * s_gh + rows_t[:, None] * s_gl + offs_p[None, :] * s_gp,
                       mask=tmask[:, None] & mask_p[None, :], other=0.0), DOT, TF32)

    h_lo, h_hi = load_state_halves(states_ptr + (bh64 * NC + c) * P * N, offs_p, mask_p, half, mask_h, N_HALF,
                                   DOT)
    w_t, seq_t = entering_state_weight(cs_t, seq_ptr + b64 * L, rows_t, tmask, start, HAS_SEQ)
    dc_lo = tl.dot(g, h_lo) * w_t[:, None]
    dc_hi = tl.dot(g, h_hi) * w_t[:, None]

    # source blocks before the target block, the decay split at the pivot (_triton_common), then the diagonal
    # block
    pivot = tl.where(tb > 0, tl.load(cs_base + tl.maximum(start + tb * BT - 1, 0)), 0.0)
    e_t = exp_ftz(cs_t - pivot)
    for s0 in range(0, tb * BT, BI):
        rows_s = start + s0 + tl.arange(0, BI)
        smask_r = valid(rows_s, L, EVEN)
        b_lo, b_hi, gu, cs_s = source_gu(g, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base, sin_base, s_tl,
                                         half, mask_h, x_base, s_xl, s_xp, offs_p, mask_p, delta_base, cs_base,
                                         N_HALF, HAS_ROPE, DOT, TF32)
        decay = e_t[:, None] * exp_ftz(pivot - cs_s)[None, :]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b64 * L + rows_s, mask=smask_r, other=-2)
            decay = tl.where(seq_t[:, None] == seq_s[None, :], decay, 0.0)
        w = to_dot(gu * decay, DOT, TF32)
        dc_lo += tl.dot(w, b_lo)
        dc_hi += tl.dot(w, b_hi)
    for s0 in range(tb * BT, tb * BT + BT, BI):
        rows_s = start + s0 + tl.arange(0, BI)
        smask_r = valid(rows_s, L, EVEN)
        b_lo, b_hi, gu, cs_s = source_gu(g, rows_s, smask_r, bm_base, s_bl, s_bn, cos_base, sin_base, s_tl,
                                         half, mask_h, x_base, s_xl, s_xp, offs_p, mask_p, delta_base, cs_base,
                                         N_HALF, HAS_ROPE, DOT, TF32)
        keep = tl.arange(0, BT)[:, None] >= (s0 - tb * BT) + tl.arange(0, BI)[None, :]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b64 * L + rows_s, mask=smask_r, other=-2)
            keep = keep & (seq_t[:, None] == seq_s[None, :])
        w = to_dot(gu * diagonal_decay(cs_t[:, None], cs_s[None, :], keep), DOT, TF32)
        dc_lo += tl.dot(w, b_lo)
        dc_hi += tl.dot(w, b_hi)

    # E_t = C~_t . dC~_t with the C~ the dots used (see the module docstring); then back through the rotation
    c_lo, c_hi = load_rotated(cm_base, rows_t, tmask, s_cl_, s_cn, cos_base, sin_base, s_tl, half, mask_h,
                              N_HALF, HAS_ROPE)
    e = tl.sum(to_dot(c_lo, DOT, TF32).to(tl.float32) * dc_lo + to_dot(c_hi, DOT, TF32).to(tl.float32) * dc_hi, 1)
    tl.store(e_ptr + bh64 * Lp + rows_t, e)
    dc_lo, dc_hi = unrotate(dc_lo, dc_hi, rows_t, tmask, cos_base, sin_base, s_tl, half, mask_h, UNROTATE)
    store_halves(dc_ptr + b64 * s_db + hi_ * s_dh, rows_t, tmask, s_dl, s_dn, half, mask_h, dc_lo, dc_hi, N_HALF)


@triton.jit
def target_rows(rows_t, tmask, cm_base, s_cl, s_cn, cos_base, sin_base, s_tl, half, mask_h, g_base, s_gl, s_gp,
                offs_p, mask_p, cs_base, N_HALF: tl.constexpr, HAS_ROPE: tl.constexpr, DOT: tl.constexpr,
                TF32: tl.constexpr):
    """For target rows t of dxdb: the C~_t halves and g_t as dot operands, and cs_t."""
    c_lo, c_hi = load_rotated(cm_base, rows_t, tmask, s_cl, s_cn, cos_base, sin_base, s_tl, half, mask_h, N_HALF,
                              HAS_ROPE)
    g = tl.load(g_base + rows_t[:, None] * s_gl + offs_p[None, :] * s_gp, mask=tmask[:, None] & mask_p[None, :],
                other=0.0)
    return (to_dot(c_lo, DOT, TF32), to_dot(c_hi, DOT, TF32), to_dot(g, DOT, TF32),
            tl.load(cs_base + rows_t))


@triton.jit
def dxdb_step(b_lo, b_hi, u, c_lo, c_hi, g, decay, du, k, db_lo, db_hi, DOT: tl.constexpr, TF32: tl.constexpr):
    """One (s, t) tile of dxdb: du += (L o C~B~^T)^T g ; K += row sums of W o C~B~^T ; dB~ += W C~ with
    W = L o (u g^T) rounded as dc rounds it."""
    scores_t = tl.dot(b_lo, tl.trans(c_lo)) + tl.dot(b_hi, tl.trans(c_hi))   # (s, t)
    du += tl.dot(to_dot(scores_t * decay, DOT, TF32), g)
    w = to_dot(tl.dot(u, tl.trans(g)) * decay, DOT, TF32)
    k += tl.sum(w.to(tl.float32) * scores_t, axis=1)
    return du, k, db_lo + tl.dot(w, c_lo), db_hi + tl.dot(w, c_hi)


@triton.jit
def dxdb_kernel(
    g_ptr, s_gb, s_gl, s_gh, s_gp,
    x_ptr, s_xb, s_xl, s_xh, s_xp,
    b_ptr, s_bb, s_bl, s_bg, s_bn,
    c_ptr, s_cb_, s_cl_, s_cg, s_cn,
    cos_ptr, sin_ptr, s_tb, s_tl,
    delta_ptr, cs_ptr, seq_ptr,
    dstates_ptr,                              # (b, H, NC, P, N) gradient of the state leaving each chunk
    dx_ptr, s_dxb, s_dxl, s_dxh, s_dxp,       # (b, l, H, P)
    db_ptr, s_db, s_dl, s_dh, s_dn,           # dB per head (b, l, H, N)
    ddelta_ptr, v_ptr, k_ptr,                 # out (b, H, Lp) fp32: du.x ; u_s . du_s (state path) ; K_s
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_NH: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr, TF32: tl.constexpr, EVEN: tl.constexpr,
    UNROTATE: tl.constexpr,
):
    c, sb, b64, hi_, gi, bh64 = tile_program(H, HPG, Q, BT)

    offs_p = tl.arange(0, BLOCK_P)
    mask_p = valid(offs_p, P, EVEN)
    half = tl.arange(0, BLOCK_NH)
    mask_h = valid(half, N_HALF, EVEN)
    N = 2 * N_HALF

    start = c * Q
    last = tl.minimum(start + Q, L) - 1
    rows_s = start + sb * BT + tl.arange(0, BT)
    smask_r = valid(rows_s, L, EVEN)
    cs_base = cs_ptr + bh64 * Lp
    delta_base = delta_ptr + bh64 * Lp
    cos_base = cos_ptr + b64 * s_tb
    sin_base = sin_ptr + b64 * s_tb
    g_base = g_ptr + b64 * s_gb + hi_ * s_gh
    cm_base = c_ptr + b64 * s_cb_ + gi * s_cg
    bm_base = b_ptr + b64 * s_bb + gi * s_bg

    # every prologue load first (the gradient of the state leaving the chunk too), so they are in flight together
    dh_lo, dh_hi = load_state_halves(dstates_ptr + (bh64 * NC + c) * P * N, offs_p, mask_p, half, mask_h, N_HALF,
                                     DOT)
    cs_s = tl.load(cs_base + rows_s)
    d_s = tl.load(delta_base + rows_s)
    b_lo, b_hi = load_rotated(bm_base, rows_s, smask_r, s_bl, s_bn, cos_base, sin_base, s_tl, half, mask_h,
                              N_HALF, HAS_ROPE)
    b_lo = pin(to_dot(b_lo, DOT, TF32))
    b_hi = pin(to_dot(b_hi, DOT, TF32))
    x_mask = smask_r[:, None] & mask_p[None, :]
    xs = tl.load(x_ptr + b64 * s_xb + hi_ * s_xh + rows_s[:, None] * s_xl + offs_p[None, :] * s_xp, mask=x_mask,
                 other=0.0).to(tl.float32)
    u_f = xs * d_s[:, None]
    u = to_dot(u_f, DOT, TF32)

    # the path through the state leaving the chunk
    w_s = tl.exp(tl.load(cs_base + start + Q - 1) - cs_s)
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b64 * L + rows_s, mask=smask_r, other=-2)
        seq_last = tl.load(seq_ptr + b64 * L + last)
        w_s = tl.where(seq_s == seq_last, w_s, 0.0)
    du = (tl.dot(b_lo, tl.trans(dh_lo)) + tl.dot(b_hi, tl.trans(dh_hi))) * w_s[:, None]
    db_lo = tl.dot(u, dh_lo) * w_s[:, None]
    db_hi = tl.dot(u, dh_hi) * w_s[:, None]
    tl.store(v_ptr + bh64 * Lp + rows_s, tl.sum(du * u_f, axis=1))
    k = tl.zeros((BT,), dtype=tl.float32)

    # within the chunk: the diagonal block (causal), then the target blocks after it (decay split at the pivot of
    # each target block, as dc splits it)
    for t0 in range(sb * BT, sb * BT + BT, BI):
        rows_t = start + t0 + tl.arange(0, BI)
        tmask = valid(rows_t, L, EVEN)
        c_lo, c_hi, g, cs_t = target_rows(rows_t, tmask, cm_base, s_cl_, s_cn, cos_base, sin_base, s_tl, half,
                                          mask_h, g_base, s_gl, s_gp, offs_p, mask_p, cs_base, N_HALF, HAS_ROPE,
                                          DOT, TF32)
        keep = (t0 - sb * BT) + tl.arange(0, BI)[None, :] >= tl.arange(0, BT)[:, None]
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b64 * L + rows_t, mask=tmask, other=-1)
            keep = keep & (seq_t[None, :] == seq_s[:, None])
        du, k, db_lo, db_hi = dxdb_step(b_lo, b_hi, u, c_lo, c_hi, g,
                                        diagonal_decay(cs_t[None, :], cs_s[:, None], keep), du, k, db_lo, db_hi,
                                        DOT, TF32)
    for t0 in range(sb * BT + BT, Q, BI):
        rows_t = start + t0 + tl.arange(0, BI)
        tmask = valid(rows_t, L, EVEN)
        c_lo, c_hi, g, cs_t = target_rows(rows_t, tmask, cm_base, s_cl_, s_cn, cos_base, sin_base, s_tl, half,
                                          mask_h, g_base, s_gl, s_gp, offs_p, mask_p, cs_base, N_HALF, HAS_ROPE,
                                          DOT, TF32)
        pivot = tl.load(cs_base + start + (t0 // BT) * BT - 1)
        decay = exp_ftz(pivot - cs_s)[:, None] * exp_ftz(cs_t - pivot)[None, :]
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b64 * L + rows_t, mask=tmask, other=-1)
            decay = tl.where(seq_t[None, :] == seq_s[:, None], decay, 0.0)
        du, k, db_lo, db_hi = dxdb_step(b_lo, b_hi, u, c_lo, c_hi, g, decay, du, k, db_lo, db_hi, DOT, TF32)

    tl.store(dx_ptr + b64 * s_dxb + hi_ * s_dxh + rows_s[:, None] * s_dxl + offs_p[None, :] * s_dxp,
             (du * d_s[:, None]).to(dx_ptr.dtype.element_ty), mask=x_mask)
    tl.store(ddelta_ptr + bh64 * Lp + rows_s, tl.sum(du * xs, axis=1))
    tl.store(k_ptr + bh64 * Lp + rows_s, k)
    db_lo, db_hi = unrotate(db_lo, db_hi, rows_s, smask_r, cos_base, sin_base, s_tl, half, mask_h, UNROTATE)
    store_halves(db_ptr + b64 * s_db + hi_ * s_dh, rows_s, smask_r, s_dl, s_dn, half, mask_h, db_lo, db_hi, N_HALF)
