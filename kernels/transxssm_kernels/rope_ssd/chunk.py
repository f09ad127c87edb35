"""Chunked SSD with Unified RoPE fused in: Triton forward and backward (the CUDA path of the SS mixer).

    y = rope_ssd(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                 rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None, return_final_state=False,
                 rotate_bc_in_place=False, a_is_log=False, launch=DEFAULT_LAUNCH)
    -> y  or  (y, final_state) when return_final_state

    x  (b, l, H, P)   bf16 / fp16 / fp32; y has x's dtype. P: any multiple of 16 (64 is the tuned case)
    dt (b, l, H)      raw; delta = softplus(dt + dt_bias) if dt_softplus else dt (+ dt_bias if given)
    A  (H,)           negative, one scalar per head (read in fp32); with a_is_log it holds log(-A) (the SS
                      mixer's A_log parameter), the kernels form A = -exp(A_log) and return d A_log
    B, C (b, l, G, N) G divides H (head h uses group h // (H // G)); N even, N/2 a multiple of 16 (64, 128 tuned)
    D  (H,) or None;  z (b, l, H, P) or None: y = (ssd + D x) * silu(z)
    rope_cos, rope_sin: None or fp32 (l, N//2) or (b, l, N//2); rotate_half pairing over N (see rope.py)
    seq_idx (b, l) int, non-decreasing: the state is reset where it changes; initial_state belongs to the first
        document. initial_state (b, H, P, N) fp32 or None; final_state (b, H, P, N) fp32.
    chunk_size: a power of two >= 16 (256 default; 64, 128 selectable); any l (the last chunk is masked).
    Inputs may have any strides with a contiguous last dim (views of one projection, sequence-first layouts); y
    and the input gradients take the memory layout of their inputs (y that of x), so a caller working in (l, b)
    order passes transposed views and gets transposed views back, with no copy either way. When x, B, C are views
    tiling one tensor (G = H), their gradients are the same views of one new tensor (_input_grads).

Every argument is differentiable (x, dt, A, B, C, D, z, dt_bias, initial_state); the RoPE tables and seq_idx are not.
All options run in the Triton kernels or in exact PyTorch glue around them; there is no fallback to the reference.

How it works (per batch row and head; Q = chunk_size, cs = within-chunk cumulative sum of delta*A):
  forward   H_{c+1} = exp(cs_last) H_c + S_c,  S_c = sum_s exp(cs_last - cs_s) delta_s x_s B~_s^T
                (state_scan_fwd_kernel: one program per batch row, head and block of N/2, walking the chunks
                 with the fp32 state in registers; stores the state entering each chunk)
            y_t = exp(cs_t) C~_t H_c^T + sum_{s<=t} exp(cs_t - cs_s) (C~_t.B~_s) delta_s x_s   (chunk_output_kernel)
  B~, C~ are rotated inside the kernels as B and C are loaded; the rotated tensors never touch memory, unless the
  caller lets the forward overwrite B and C with them (rotate_bc_in_place, the SS mixer's call): then the chunk sums
  write B~, chunk_output_tma_kernel reads it through the copy engine straight into its dots and writes C~, and the
  backward loads both as they are (_in_place_descriptors says where it applies).
  With few batch rows x heads the two scans run chunk-parallel instead (_states.py: each chunk's own sum in
  parallel, then an elementwise pass over the chunks; LaunchConfig.scan_mode, _scan_mode).
  backward  state_scan_bwd_kernel (reverse walk), dc_kernel (dC), dxdb_kernel (dx, dB); see _bwd.py. The gradient
  through the rotation is the inverse rotation, applied before storing dB, dC. d(delta*A) comes from C~.dC~ and
  B~.dB~ row sums in fp32 (their diagonal twins cancel in fp32, not after bf16 rounding; see _bwd.py).
  Saved for backward: the inputs, delta and cs (b, H, Lp) fp32, and the state entering each chunk
  (b, H, chunks, P, N) in the input dtype (fp32 for fp32 inputs; the tile kernels round it to that dtype for their
  dots anyway): 2*P*N/Q bytes per token and head in bf16 (64 B at P=64, N=128, Q=256).
dt -> delta (bias, softplus) and its within-chunk cumulative sum, and back to d dt, dA, d dt_bias, run in the two
small kernels of _delta.py; the D skip and the z gate (options off the default path) are PyTorch around the one
autograd Function.
Speed (H200, 1.3B layer H=G=32, P=64, N=128, l=4096, 32K tokens, bf16): 0.68 ms forward, 2.17 ms forward+backward
(chunk 128: 0.57 / 1.91); PyTorch SDPA with the same heads 4.71; docs/kernels.md has the grid and what limits it.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._bwd import dc_kernel, dxdb_kernel, state_scan_bwd_kernel
from ._delta import delta_kernel, dt_grad_kernel, head_grads_kernel
from ._fwd import chunk_output_kernel, chunk_output_tma_kernel, state_scan_fwd_kernel
from ._states import chunk_sums_kernel, dstates_from_sums_kernel, states_from_sums_kernel
from .launch import DEFAULT_LAUNCH, LaunchConfig
from .naive import check_ssd_inputs

try:  # host-side tensor descriptors (TMA) for chunk_output_tma_kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _dot_dtype(dtype):
    """Dot operand type: the input dtype (fp32 runs as tf32). Triton's CPU interpreter multiplies bf16 as raw
    integers (triton 3.8), so under TRITON_INTERPRET bf16 operands are multiplied in fp32 instead."""
    if dtype == torch.bfloat16:
        return tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _meta(P, N, Q, dtype, launch):
    min_nh = 16 if os.environ.get("TRITON_INTERPRET") == "1" else launch.half_tile_min
    return dict(
        DOT=_dot_dtype(dtype),
        N_HALF=N // 2,
        Q=Q,
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_NH=max(min_nh, triton.next_power_of_2(N // 2)),
    )


def _even(l, P, N, Q, meta):
    """Whole chunks and unpadded P, N: the tile kernels run without masks (EVEN)."""
    return l % Q == 0 and meta["BLOCK_P"] == P and meta["BLOCK_NH"] == N // 2




def _state_dtype(x, rounded):
    return x.dtype if rounded else torch.float32


def _tables(cos, sin, ref, launch):
    """Return (cos, sin, stride_b, stride_l, has_rope) with the last dim contiguous."""
    if cos is None:
        dummy = torch.zeros(1, device=ref.device, dtype=torch.float32)
        return dummy, dummy, 0, 0, False
    dtype = launch.table_dtype(ref.dtype)
    cos = cos.to(dtype).contiguous()
    sin = sin.to(dtype).contiguous()
    if cos.dim() == 2:
        return cos, sin, 0, cos.stride(0), True
    return cos, sin, cos.stride(0), cos.stride(1), True


# TRANSXSSM_SSD_AUTOTUNE=1: Triton's autotuner chooses warps, stages and scan columns per shape key over the configs
# below (kernels with atomic accumulators name them in reset_to_zero) instead of the LaunchConfig's; the
# chunk-parallel state kernels (_states.py) keep the LaunchConfig's options.
AUTOTUNE = os.environ.get("TRANSXSSM_SSD_AUTOTUNE", "0") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
_KEY = ["P", "N_HALF", "Q", "H", "L", "HAS_ROPE", "HAS_SEQ", "BT"]
_TILE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
_SCAN_CONFIGS = [triton.Config({"BNH": n}, num_warps=4, num_stages=s) for n in (16, 32, 64) for s in (2, 3)]


def _tunable(kernel, key, configs, reset=None):
    return triton.autotune(configs, key=key, reset_to_zero=reset)(kernel) if AUTOTUNE else kernel


_state_fwd = _tunable(state_scan_fwd_kernel, _KEY[:-1], _SCAN_CONFIGS)
_state_bwd = _tunable(state_scan_bwd_kernel, _KEY[:-1], _SCAN_CONFIGS, reset=["kdec_ptr"])
_chunk_output = _tunable(chunk_output_kernel, _KEY, _TILE_CONFIGS)
_dc = _tunable(dc_kernel, _KEY, _TILE_CONFIGS)
_dxdb = _tunable(dxdb_kernel, _KEY, _TILE_CONFIGS)


def _options(kernel_options):
    """Launch keyword arguments of a tile kernel (none when the autotuner chooses)."""
    return {} if AUTOTUNE else kernel_options.as_kwargs()


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _widest_columns(N):
    """Half-columns per program when one program takes a whole state row: all N/2, within 16..64 (dot tiles)."""
    return max(16, min(64, triton.next_power_of_2(N // 2)))


def _scan_columns(b, H, N, device):
    """Half-columns per state-scan program. All N/2 (up to 64) reads x (or dy) once per head, 0.1 ms faster
    fwd+bwd than 32 on the H200 at the 1.3B layer (docs/kernels.md), as long as the b*H programs still cover every
    SM; fewer batch rows (long sequences) split the columns to keep the SMs busy."""
    sms = _sm_count(device)
    cols = _widest_columns(N)
    while cols > 16 and b * H * triton.cdiv(N // 2, cols) < sms:
        cols //= 2
    return cols


def _scan_launch(kernel_options, columns, b, H, N, device):
    """(grid, launch options) of a state scan: the autotuner's BNH, a fixed one, or _scan_columns'."""
    if AUTOTUNE:
        return (lambda meta: (b * H, triton.cdiv(N // 2, meta["BNH"]))), {}
    cols = columns or _scan_columns(b, H, N, device)
    return (b * H, triton.cdiv(N // 2, cols)), dict(kernel_options.as_kwargs(), BNH=cols)


def _scan_mode(launch, b, H, device):
    """"walk" or "chunks": how the state recurrence runs (launch.py, scan_mode). Chosen per call: the walk once
    its b*H programs cover the SMs, else the chunk-parallel steps of _states.py. On the H200 (GPU time per 1.3B
    layer forward+backward, docs/kernels.md) chunks take 7% less at b*H = 64 (1.3B, two 4K sequences) and 20% less
    at 32 (one 32K sequence), the walk 6% less at 256 (eight 4K sequences)."""
    if launch.scan_mode is not None:
        if launch.scan_mode not in ("walk", "chunks"):
            raise ValueError(f"LaunchConfig.scan_mode must be 'walk', 'chunks' or None, got {launch.scan_mode!r}")
        return launch.scan_mode
    sms = _sm_count(device)
    return "walk" if b * H >= sms else "chunks"


def _chunk_sums(mode, v, m, tables, delta_p, cs, seq_t, l, H, nc, meta, flags, launch, store_rotated=False):
    """Every chunk's own sum (b, H, chunks, P, N) fp32: S_c from (x, B) with mode 0, T_c from (g, C) with mode 1;
    store_rotated writes the rotated rows over m."""
    b, _, _, P = v.shape
    G, N = m.shape[2], m.shape[3]
    cos_t, sin_t, s_tb, s_tl = tables
    cols = _widest_columns(N)
    sums = torch.empty((b, H, nc, P, N), device=v.device, dtype=torch.float32)
    chunk_sums_kernel[(b * H, triton.cdiv(N // 2, cols), nc)](
        v, *_strides4(v), m, *_strides4(m), cos_t, sin_t, s_tb, s_tl, delta_p, cs, seq_t, sums,
        l, delta_p.shape[-1], H, H // G, P, nc, N_HALF=N // 2, Q=meta["Q"],
        BS=min(launch.block_scan_fwd if mode == 0 else launch.block_scan_bwd, meta["Q"]), BLOCK_P=meta["BLOCK_P"],
        BNH=cols, MODE=mode, DOT=meta["DOT"], STORE_ROTATED=store_rotated, **flags, **launch.chunk_sums.as_kwargs())
    return sums


def _row_descriptor(t, block):
    """(descriptor, rb, cb) of a (b, l, heads, cols) tensor whose element (batch, position, ., col) sits at row
    position + batch * rb and column batch * cb + . of a 2-D descriptor: batch-first (rb = l) and sequence-first
    (cb = the batch stride) layouts; None for other strides or a misaligned start."""
    b, l = t.shape[0], t.shape[1]
    s_b, s_l = t.stride(0), t.stride(1)
    if t.stride(3) != 1 or (s_l * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    if b == 1 or s_b == l * s_l:
        rows, rb, cb = b * l, l, 0
    elif s_l == b * s_b:
        rows, rb, cb = l, 0, s_b
    else:
        return None
    return TensorDescriptor(t, [rows, s_l], [s_l, 1], block), rb, cb


def _in_place_descriptors(x, B, C, cos_t, states, has_rope, scan_mode, even, BT, BI, meta):
    """Descriptors of x and B for chunk_output_tma_kernel when B and C can be rotated in place (rope_ssd's
    rotate_bc_in_place), else None: RoPE, one head per group (no two programs read the same rows), the
    chunk-parallel state recurrence (its chunk sums write B~), whole chunks with one source block per row block,
    16-bit inputs, tables and states, a Hopper GPU (or the interpreter) and descriptor-friendly strides; B and C
    not one tensor passed twice (it would be rotated twice)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if (TensorDescriptor is None or not has_rope or B.shape[2] != x.shape[2] or scan_mode != "chunks"
            or B.data_ptr() == C.data_ptr()
            or not (even and BT == BI) or x.dtype not in (torch.bfloat16, torch.float16)
            or not x.dtype == B.dtype == C.dtype == cos_t.dtype == states.dtype
            or not (interpret or (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9))):
        return None
    views = _row_descriptor(x, [BT, x.shape[3]]), _row_descriptor(B, [BT, meta["N_HALF"]])
    if None in views:
        return None
    (xd, x_rb, x_cb), (bd, b_rb, b_cb) = views
    return xd, x_rb, x_cb, x.stride(2), bd, b_rb, b_cb, B.stride(2)


def _tile_one_tensor(parts):
    """The tensor of which `parts` are disjoint views covering it whole, side by side along the last dim with the
    same outer shape and strides (the SS mixer's x, B, C split from its projection); None otherwise."""
    root = parts[0]._base
    if root is None or not root.is_contiguous() or any(t._base is not root or t.stride(-1) != 1 for t in parts):
        return None
    first = parts[0]
    if any(t.shape[:-1] != first.shape[:-1] or t.stride()[:-1] != first.stride()[:-1] for t in parts):
        return None
    spans = sorted((t.storage_offset() - root.storage_offset(), t.shape[-1]) for t in parts)
    side_by_side = spans[0][0] == 0 and all(a + w == b for (a, w), (b, _) in zip(spans, spans[1:]))
    row = spans[-1][0] + spans[-1][1]
    if side_by_side and row == min(first.stride()[:-1]) and sum(t.numel() for t in parts) == root.numel():
        return root
    return None


def _input_grads(*inputs):
    """Empty gradients for the inputs (torch.empty_like each). When the inputs are views tiling one tensor, the
    gradients are the same views of one new tensor: a split's backward (the SS mixer's) then passes that tensor on
    whole instead of concatenating the pieces."""
    root = _tile_one_tensor(inputs)
    if root is None:
        return tuple(torch.empty_like(t) for t in inputs)
    whole = torch.empty_like(root)
    return tuple(whole.as_strided(t.shape, t.stride(), t.storage_offset() - root.storage_offset()) for t in inputs)


def _pass_grid(b, H, P, N, launch):
    return b * H, triton.cdiv(P * N, launch.pass_block)


class _RopeSSDCore(torch.autograd.Function):
    """(x, dt, A, dt_bias, B, C, tables, seq, initial_state) -> (y, final_state); delta and its within-chunk cumulative
    sums come from delta_kernel, the gradients of dt, A, dt_bias from dt_grad_kernel (_delta.py)."""

    @staticmethod
    def forward(ctx, x, dt, A, dt_bias, B, C, cos, sin, seq, initial_state, Q, y_dtype, softplus, launch, in_place,
                a_is_log):
        b, l, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc = triton.cdiv(max(l, 1), Q)
        Lp = nc * Q
        BT, BI = min(launch.block_rows, Q), min(launch.block_inner_fwd, launch.block_rows, Q)
        A = A.contiguous()   # the kernels read it in fp32 (and form -exp of it when it holds log(-A))
        bias = dt_bias.contiguous() if dt_bias is not None else A
        delta_p, cs = torch.empty((2, b, H, Lp), device=x.device, dtype=torch.float32)
        delta_kernel[(nc, b * H)](dt, *dt.stride(), bias, A, delta_p, cs, l, Lp, H, Q=Q,
                                  HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, A_IS_LOG=a_is_log)
        cos_t, sin_t, s_tb, s_tl, has_rope = _tables(cos, sin, x, launch)
        has_seq = seq is not None
        seq_t = seq if has_seq else torch.empty(1, device=x.device, dtype=torch.int32)   # not read
        meta = _meta(P, N, Q, x.dtype, launch)
        flags = dict(HAS_ROPE=has_rope, HAS_SEQ=has_seq)

        states = torch.empty((b, H, nc, P, N), device=x.device, dtype=_state_dtype(x, launch.states_in_input_dtype))
        final = torch.empty((b, H, P, N), device=x.device, dtype=torch.float32)
        init = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
        scan_mode = _scan_mode(launch, b, H, x.device)
        even = _even(l, P, N, Q, meta)
        descriptors = (_in_place_descriptors(x, B, C, cos_t, states, has_rope, scan_mode, even, BT, BI, meta)
                       if in_place else None)
        if scan_mode == "walk":
            scan_grid, scan_opts = _scan_launch(launch.scan_fwd, launch.scan_columns, b, H, N, x.device)
            _state_fwd[scan_grid](
                x, *_strides4(x), B, *_strides4(B), cos_t, sin_t, s_tb, s_tl, delta_p, cs, seq_t, init, states,
                final, l, Lp, H, H // G, P, nc, BS=min(launch.block_scan_fwd, Q), HAS_INIT=initial_state is not None,
                **flags, **meta, **scan_opts)
        else:
            sums = _chunk_sums(0, x, B, (cos_t, sin_t, s_tb, s_tl), delta_p, cs, seq_t, l, H, nc, meta, flags, launch,
                               store_rotated=descriptors is not None)
            states_from_sums_kernel[_pass_grid(b, H, P, N, launch)](
                sums, cs, seq_t, init, states, final, l, Lp, H, P * N, nc, Q=Q, BLOCK=launch.pass_block,
                HAS_SEQ=has_seq, HAS_INIT=initial_state is not None, **launch.state_pass.as_kwargs())
            del sums
        y = torch.empty_like(x, dtype=y_dtype)  # x's memory layout: sequence-first views give a sequence-first y
        if descriptors is not None:   # B holds B~ now; this kernel writes C~ over C
            chunk_output_tma_kernel[(nc * (Q // BT), b * H)](
                *descriptors, C, *_strides4(C), cos_t, sin_t, s_tb, s_tl, delta_p, cs, seq_t, states, y, *_strides4(y),
                l, Lp, H, H // G, nc, N_HALF=N // 2, Q=Q, BT=BT, BLOCK_P=meta["BLOCK_P"], HAS_SEQ=has_seq,
                DOT=meta["DOT"], **launch.output_tma.as_kwargs())
        else:
            _chunk_output[(nc * (Q // BT), b * H)](
                x, *_strides4(x), B, *_strides4(B), C, *_strides4(C), cos_t, sin_t, s_tb, s_tl,
                delta_p, cs, seq_t, states, y, *_strides4(y),
                l, Lp, H, H // G, P, nc, BT=BT, BI=BI, EVEN=even, **flags, **meta, **_options(launch.output))

        ctx.save_for_backward(x, dt, A, bias, delta_p, cs, B, C, cos_t, sin_t, seq_t, states)
        ctx.cfg = (Q, s_tb, s_tl, has_rope, has_seq, initial_state is not None, dt_bias is not None, softplus,
                   a_is_log)
        ctx.launch = launch
        ctx.scan_mode = scan_mode
        ctx.rotated = descriptors is not None   # B and C now hold B~ and C~
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, bias, delta_p, cs, B, C, cos_t, sin_t, seq_t, states = ctx.saved_tensors
        Q, s_tb, s_tl, has_rope, has_seq, has_init, has_bias, softplus, a_is_log = ctx.cfg
        b, l, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Lp = delta_p.shape[-1]
        nc = Lp // Q
        launch = ctx.launch
        BT = min(launch.block_rows, Q)
        tf32 = x.dtype == torch.float32 and os.environ.get("TRITON_INTERPRET") != "1"
        meta = _meta(P, N, Q, x.dtype, launch)
        flags = dict(HAS_ROPE=has_rope and not ctx.rotated, HAS_SEQ=has_seq)   # rotate B, C as they are loaded
        even = _even(l, P, N, Q, meta)
        dev = x.device
        if dy is None:
            dy = torch.zeros_like(x)
        g = dy.to(x.dtype)
        if g.stride(-1) != 1:
            g = g.contiguous()

        # gradient of the state leaving each chunk (reverse scan) and the chunk-decay part of d a, K_c, in parts
        # (b, H, nc, parts) that dt_grad_kernel adds up
        dstates = torch.empty((b, H, nc, P, N), device=dev, dtype=_state_dtype(x, launch.dstates_in_input_dtype))
        dinit = torch.empty((b, H, P, N), device=dev, dtype=torch.float32)
        dfin = dfinal.to(torch.float32).contiguous() if dfinal is not None else dinit
        if ctx.scan_mode == "walk":
            kparts = torch.zeros((b, H, nc, 1), device=dev, dtype=torch.float32)
            scan_grid, scan_opts = _scan_launch(launch.scan_bwd, launch.scan_columns, b, H, N, dev)
            _state_bwd[scan_grid](
                g, *_strides4(g), C, *_strides4(C), cos_t, sin_t, s_tb, s_tl, cs, seq_t, states, dfin, dstates,
                dinit, kparts, l, Lp, H, H // G, P, nc, BS=min(launch.block_scan_bwd, Q),
                HAS_DFINAL=dfinal is not None, **flags, **meta, **scan_opts)
        else:
            sums = _chunk_sums(1, g, C, (cos_t, sin_t, s_tb, s_tl), cs, cs, seq_t, l, H, nc, meta, flags, launch)
            pass_grid = _pass_grid(b, H, P, N, launch)
            kparts = torch.empty((b, H, nc, pass_grid[1]), device=dev, dtype=torch.float32)
            dstates_from_sums_kernel[pass_grid](
                sums, cs, seq_t, states, dfin, dstates, dinit, kparts, l, Lp, H, P * N, nc, Q=Q,
                BLOCK=launch.pass_block, HAS_SEQ=has_seq, HAS_DFINAL=dfinal is not None,
                **launch.state_pass.as_kwargs())
            del sums

        # per-token gradients; with G < H the per-head dB, dC are summed over each group's heads
        if G == H:
            dx, dB_h, dC_h = _input_grads(x, B, C)
        else:
            dx = torch.empty_like(x)
            dB_h = torch.empty((b, l, H, N), device=dev, dtype=torch.float32)
            dC_h = torch.empty((b, l, H, N), device=dev, dtype=torch.float32)
        e, k, ddelta, v = torch.empty((4, b, H, Lp), device=dev, dtype=torch.float32)
        grid = (nc * (Q // BT), b * H)
        _dc[grid](
            g, *_strides4(g), x, *_strides4(x), B, *_strides4(B), C, *_strides4(C), cos_t, sin_t, s_tb, s_tl,
            delta_p, cs, seq_t, states, dC_h, *_strides4(dC_h), e,
            l, Lp, H, H // G, P, nc, BT=BT, TF32=tf32, EVEN=even, **flags, **meta, UNROTATE=has_rope,
            BI=min(launch.block_inner_dc_in_place if ctx.rotated else launch.block_inner_dc, BT), **_options(launch.dc))
        _dxdb[grid](
            g, *_strides4(g), x, *_strides4(x), B, *_strides4(B), C, *_strides4(C), cos_t, sin_t, s_tb, s_tl,
            delta_p, cs, seq_t, dstates, dx, *_strides4(dx), dB_h, *_strides4(dB_h), ddelta, v, k,
            l, Lp, H, H // G, P, nc, BT=BT, BI=min(launch.block_inner_dxdb, BT), TF32=tf32, EVEN=even,
            **flags, **meta, UNROTATE=has_rope, **_options(launch.dxdb))
        if G == H:
            dB, dC = dB_h, dC_h
        else:
            dB = dB_h.view(b, l, G, H // G, N).sum(3).to(B.dtype)
            dC = dC_h.view(b, l, G, H // G, N).sum(3).to(C.dtype)
        # d a_j = sum_{t >= j} (E_t - K_t) + sum_{s < j} V_s + K_c (see _bwd.py), then dt, A, dt_bias (_delta.py)
        ddt = torch.empty_like(dt)
        part_a, part_bias = torch.empty((2, b, H, nc), device=dev, dtype=torch.float32)
        nparts = kparts.shape[-1]
        dt_grad_kernel[(nc, b * H)](e, k, v, ddelta, kparts, delta_p, dt, *dt.stride(), bias, A, ddt, *ddt.stride(),
                                    part_a, part_bias, l, Lp, H, nc, nparts, Q=Q,
                                    BLOCK_KPARTS=triton.next_power_of_2(nparts), HAS_BIAS=has_bias,
                                    SOFTPLUS=softplus, A_IS_LOG=a_is_log)
        dA = torch.empty_like(A)
        dbias = torch.empty_like(bias) if has_bias else None
        head_grads_kernel[(H,)](part_a, part_bias, A, dA, dbias if has_bias else dA, b, H, nc,
                                BLOCK_C=min(triton.next_power_of_2(nc), 64), HAS_BIAS=has_bias, A_IS_LOG=a_is_log)
        return (dx, ddt, dA, dbias, dB, dC, None, None, None, (dinit if has_init else None), None, None, None, None,
                None, None)


def rope_ssd(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
             rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None, return_final_state=False,
             rotate_bc_in_place=False, a_is_log=False, launch: LaunchConfig = DEFAULT_LAUNCH):
    """Fused chunked SSD with Unified RoPE on CUDA (Triton). Signature and shapes: see the module docstring;
    `launch` sets tile sizes, state precision and each kernel's launch options (launch.py). rotate_bc_in_place:
    the caller owns B and C and reads them no more, and the forward may overwrite them with their rotated values
    (where _in_place_descriptors allows), which the backward then loads without rotating them again."""
    b, l, H, P, G, N = check_ssd_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, rope_cos=rope_cos,
                                        rope_sin=rope_sin, seq_idx=seq_idx, initial_state=initial_state)
    Q = int(chunk_size)
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if N % 32:
        raise ValueError(f"rope_ssd needs N/2 to be a multiple of 16 (B.shape[3]={N}); use ssd_chunked_reference")
    if P % 16:
        raise ValueError(f"rope_ssd needs P (x.shape[3]={P}) to be a multiple of 16; use ssd_chunked_reference")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"rope_ssd takes bf16/fp16/fp32 x, got {x.dtype}; float64 goes to ssd_chunked_reference")
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    gated = D is not None or z is not None
    y, final = _RopeSSDCore.apply(x, dt, A, dt_bias, B, C, rope_cos, rope_sin, seq, initial_state, Q,
                                  torch.float32 if gated else x.dtype, bool(dt_softplus), launch,
                                  bool(rotate_bc_in_place), bool(a_is_log))
    if gated:
        if D is not None:
            y = y + D.to(torch.float32)[:, None] * x.to(torch.float32)
        if z is not None:
            y = y * F.silu(z.to(torch.float32))
        y = y.to(x.dtype)
    return (y, final) if return_final_state else y
