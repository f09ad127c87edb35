"""The state recurrence over chunks in two parallel steps: the chunk-parallel alternative to the scans' walk.

The walking scans (state_scan_fwd_kernel, state_scan_bwd_kernel) give each (batch row, head, column block) one
program that reads the whole sequence in order. With few batch rows that is few programs, each a long chain of
dependent steps, and narrow column blocks that read x (or g) once per block: at the 1.3B layer with two sequences
the scans take 3x longer per token than with eight. Here the same recurrence runs as
  1. chunk_sums_kernel       grid (b*H, N/2 / columns, chunks): each chunk's own sum, in fp32,
                             forward  S_c = sum_s delta_s exp(cs_last - cs_s) x_s B~_s^T
                             backward T_c = sum_t exp(cs_t) g_t C~_t^T
  2. states_from_sums_kernel grid (b*H, P*N / block): H_{c+1} = decay_c H_c + S_c elementwise, chunk after chunk;
     dstates_from_sums_kernel the reverse, dH_c = decay_c dH_{c+1} + T_c, with K_c = decay_c <dH_{c+1}, H_c>
                             in parts per block, summed by the caller.
Both store exactly what the walks store (chunk.py chooses between them per call). The price is one fp32 write and
read of every chunk's sum: 8 P N bytes per chunk and head.
"""

import triton
import triton.language as tl

from ._fwd import add_block_outer, chunk_decay
from ._triton_common import scan_program, store_scan_state


@triton.jit
def chunk_sums_kernel(
    v_ptr, s_vb, s_vl, s_vh, s_vp,            # x (forward) or g (backward): (b, l, H, P)
    m_ptr, s_mb, s_ml, s_mg, s_mn,            # B (forward) or C (backward): (b, l, G, N)
    cos_ptr, sin_ptr, s_tb, s_tl,
    delta_ptr, cs_ptr, seq_ptr,               # (b, H, Lp) fp32; (b, l) int32
    sums_ptr,                                 # out (b, H, NC, P, N) fp32
    L, Lp, H, HPG, P, NC,
    N_HALF: tl.constexpr, Q: tl.constexpr, BS: tl.constexpr, BLOCK_P: tl.constexpr, BNH: tl.constexpr,
    MODE: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    STORE_ROTATED: tl.constexpr,
):
    """One chunk's sum of row outer products (MODE 0: S_c, MODE 1: T_c, see add_block_outer) for one (batch row,
    head) and block of columns. Grid (b*H, N/2 / BNH, chunks). STORE_ROTATED writes the rotated rows of M over M
    (B and C rotated in place: one head per group, so no other program reads them)."""
    b64, hi_, gi, bh64, half, mask_h, st_off, st_mask = scan_program(H, HPG, P, N_HALF, BLOCK_P, BNH)
    c = tl.program_id(2)
    v_base = v_ptr + b64 * s_vb + hi_ * s_vh
    m_base = m_ptr + b64 * s_mb + gi * s_mg
    acc_lo = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_P, BNH), dtype=tl.float32)
    for s0 in range(0, Q, BS):
        acc_lo, acc_hi = add_block_outer(acc_lo, acc_hi, v_base, s_vl, s_vp, m_base, s_ml, s_mn,
                                         cos_ptr + b64 * s_tb, sin_ptr + b64 * s_tb, s_tl,
                                         delta_ptr + bh64 * Lp, cs_ptr + bh64 * Lp, seq_ptr + b64 * L, c * Q, s0,
                                         L, P, half, mask_h, N_HALF, Q, BS, BLOCK_P, MODE, HAS_ROPE, HAS_SEQ, DOT,
                                         STORE_ROTATED)
    store_scan_state(sums_ptr + (bh64 * NC + c) * P * (2 * N_HALF), acc_lo, acc_hi, st_off, st_mask, N_HALF)


@triton.jit
def _pass_program(cs_ptr, seq_ptr, start_ptr, L, Lp, H, PN, BLOCK: tl.constexpr, HAS_START: tl.constexpr):
    """(batch*H + head as int64, its cs and seq rows, this program's offsets into a (P x N) state and their mask,
    and its block of the (b, H, P, N) fp32 state the pass starts from: start_ptr's, or zeros without it)."""
    bh64 = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_START:
        start = tl.load(start_ptr + bh64 * PN + offs, mask=mask, other=0.0)
    else:
        start = tl.zeros((BLOCK,), dtype=tl.float32)
    return bh64, cs_ptr + bh64 * Lp, seq_ptr + (bh64 // H) * L, offs, mask, start


@triton.jit
def states_from_sums_kernel(
    sums_ptr,                                 # (b, H, NC, P, N) fp32: S_c
    cs_ptr, seq_ptr, init_ptr,                # (b, H, Lp) fp32; (b, l) int32; (b, H, P, N) fp32
    states_ptr,                               # out (b, H, NC, P, N): the state entering each chunk
    final_ptr,                                # out (b, H, P, N) fp32
    L, Lp, H, PN, NC,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """H_0 = initial state (or 0); store H_c, then H_{c+1} = decay_c H_c + S_c. Grid (b*H, P*N / BLOCK)."""
    bh64, cs_base, seq_base, offs, mask, h = _pass_program(cs_ptr, seq_ptr, init_ptr, L, Lp, H, PN, BLOCK, HAS_INIT)
    for c in range(NC):
        at = (bh64 * NC + c) * PN + offs
        tl.store(states_ptr + at, h.to(states_ptr.dtype.element_ty), mask=mask)
        h = chunk_decay(cs_base, seq_base, c, L, Q, HAS_SEQ) * h + tl.load(sums_ptr + at, mask=mask, other=0.0)
    tl.store(final_ptr + bh64 * PN + offs, h, mask=mask)


@triton.jit
def dstates_from_sums_kernel(
    sums_ptr,                                 # (b, H, NC, P, N) fp32: T_c
    cs_ptr, seq_ptr,
    states_ptr,                               # (b, H, NC, P, N) the state entering each chunk (forward)
    dfinal_ptr,                               # (b, H, P, N) fp32
    dstates_ptr,                              # out (b, H, NC, P, N): gradient of the state leaving each chunk
    dinit_ptr,                                # out (b, H, P, N) fp32
    kpart_ptr,                                # out (b, H, NC, P*N / BLOCK) fp32: this block's part of K_c
    L, Lp, H, PN, NC,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    """dH_NC = d final state (or 0); last chunk first: store dH_{c+1} and this block's part of
    K_c = decay_c <dH_{c+1}, H_c>, then dH_c = decay_c dH_{c+1} + T_c. Grid (b*H, P*N / BLOCK). The parts are
    stored, not added atomically, so that the caller sums them in a fixed order (bit-repeatable gradients)."""
    bh64, cs_base, seq_base, offs, mask, r = _pass_program(cs_ptr, seq_ptr, dfinal_ptr, L, Lp, H, PN, BLOCK,
                                                           HAS_DFINAL)
    for i in range(NC):
        c = NC - 1 - i
        at = (bh64 * NC + c) * PN + offs
        tl.store(dstates_ptr + at, r.to(dstates_ptr.dtype.element_ty), mask=mask)
        decay = chunk_decay(cs_base, seq_base, c, L, Q, HAS_SEQ)
        h = tl.load(states_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(kpart_ptr + (bh64 * NC + c) * tl.num_programs(1) + tl.program_id(1), decay * tl.sum(r * h, 0))
        r = decay * r + tl.load(sums_ptr + at, mask=mask, other=0.0)
    tl.store(dinit_ptr + bh64 * PN + offs, r, mask=mask)
