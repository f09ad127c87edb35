"""Chunked SSD with Unified RoPE in plain PyTorch: the model's CPU path and the Triton kernel's reference.

    y = ssd_chunked_reference(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                              rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None,
                              return_final_state=False)
    -> y  or  (y, final_state) when return_final_state

    x  (b, l, H, P)   any float dtype; y has x's dtype
    dt (b, l, H)      raw; delta = softplus(dt + dt_bias) if dt_softplus else dt (+ dt_bias if given)
    A  (H,)           negative (A = -exp(A_log)); one scalar per head
    B, C (b, l, G, N) G divides H; head h uses group h // (H // G)
    D  (H,) or None   skip: y += D[h] * x
    z  (b, l, H, P) or None   gate: y *= silu(z)   (applied after the D skip)
    rope_cos, rope_sin: None or (l, N//2) or (b, l, N//2), rotate_half pairing over N (see rope.py)
    seq_idx (b, l) int or None: document index per token, non-decreasing; the state resets where it changes
    initial_state (b, H, P, N) or None; final_state (b, H, P, N)

Same numbers as naive.py (the definition), computed chunk by chunk. State math in fp32 (float64 for float64 x);
final_state has that dtype. Any l works: the last chunk is padded internally with delta = 0 tokens, which neither
decay nor feed the state. Differentiable by autograd in every tensor argument.

With a_t = delta_t * A (log-decay, <= 0), the output splits per chunk of Q tokens into
    intra-chunk  y_t += sum_{s<=t in chunk} (C~_t . B~_s) exp(a_{s+1} + ... + a_t) delta_s x_s   (quadratic part)
    inter-chunk  y_t += exp(a_{chunk start} + ... + a_t) * S_in C~_t, S_in = state entering the chunk
and chunk states are passed along with the chunk's total decay. Documents (seq_idx): every decay factor that links
tokens (or a token and a state) of different documents is zeroed, by setting its log to -inf before exp.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .naive import check_ssd_inputs, compute_delta, rotate_and_expand, state_dtype


def segment_sum(a: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf for i < j or where allowed is False.

    a (..., T) -> (..., T, T). Summing a masked cumulative sum (not differencing one prefix sum) keeps each entry
    exact up to its own terms, so long chunks do not lose precision to cancellation.
    """
    T = a.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~strictly_lower, 0.0)  # terms[k, j] = a_k for k > j
    out = terms.cumsum(dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    if allowed is not None:
        keep = keep & allowed
    return out.masked_fill(~keep, float("-inf"))


def _pad_and_chunk(t: torch.Tensor, pad: int, Q: int, value: float = 0.0) -> torch.Tensor:
    """(b, l, ...) -> (b, c, Q, ...) after padding l at the end with `pad` entries equal to `value`."""
    if pad:
        t = torch.cat((t, t.new_full((t.shape[0], pad, *t.shape[2:]), value)), dim=1)
    return t.reshape(t.shape[0], -1, Q, *t.shape[2:])


class _DocumentMasks(NamedTuple):
    """Which decay factors may be nonzero when sequences are packed; None everywhere without seq_idx.

    Each is bool with a singleton head dim so it broadcasts against (b, H, ...) decays.
    """
    same_doc_in_chunk: torch.Tensor | None    # (b, 1, c, Q, Q): token s may feed token t of the same chunk
    to_chunk_end: torch.Tensor | None         # (b, 1, c, Q): token s may feed the state at its chunk's end
    from_chunk_start: torch.Tensor | None     # (b, 1, c, Q): token t may read the state entering its chunk
    same_doc_boundaries: torch.Tensor | None  # (b, 1, c+1, c+1): the state at boundary j may reach boundary k


def _document_masks(seq_idx: torch.Tensor | None, pad: int, Q: int) -> _DocumentMasks:
    if seq_idx is None:
        return _DocumentMasks(None, None, None, None)
    # Padding repeats the last document, so padded tokens sit between the last real token and the final state.
    doc = torch.cat((seq_idx, seq_idx[:, -1:].expand(-1, pad)), dim=1).reshape(seq_idx.shape[0], -1, Q)
    # Document at each chunk boundary: the first token's for the initial state, then each chunk's last token's.
    # seq_idx is non-decreasing, so equal indices at two points mean no document starts between them.
    boundary_doc = torch.cat((seq_idx[:, :1], doc[:, :, -1]), dim=1)                  # (b, c+1)
    return _DocumentMasks(
        same_doc_in_chunk=(doc[:, :, :, None] == doc[:, :, None, :]).unsqueeze(1),
        to_chunk_end=(doc == doc[:, :, -1:]).unsqueeze(1),
        from_chunk_start=(doc == boundary_doc[:, :-1, None]).unsqueeze(1),
        same_doc_boundaries=(boundary_doc[:, :, None] == boundary_doc[:, None, :]).unsqueeze(1),
    )


def _masked_exp(log_decay: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """exp(log_decay), exactly 0 where not allowed (-inf before exp keeps gradients finite)."""
    return torch.exp(log_decay if allowed is None else log_decay.masked_fill(~allowed, float("-inf")))


def ssd_chunked_reference(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                          rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None,
                          return_final_state=False, a_is_log=False):
    """Chunked SSD (see the module docstring for shapes); equal to ssd_naive up to rounding. a_is_log: A holds
    log(-A), as in rope_ssd."""
    b, l, H, P, G, N = check_ssd_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, rope_cos=rope_cos,
                                        rope_sin=rope_sin, seq_idx=seq_idx, initial_state=initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = state_dtype(x)
    if a_is_log:
        A = -torch.exp(A.to(dtype))
    delta = compute_delta(dt, dt_bias, dt_softplus, dtype)              # (b, l, H)
    B, C, R = rotate_and_expand(B, C, rope_cos, rope_sin, H, dtype)      # (b, l, G, N), rotated
    xs = x.to(dtype)
    if l == 0:  # nothing to scan: the state passes through unchanged
        state = xs.new_zeros((b, H, P, N)) if initial_state is None else initial_state.to(dtype)
        return (x.clone(), state) if return_final_state else x.clone()

    Q = min(chunk_size, l)       # a short sequence needs no padding up to a full chunk
    pad = (-l) % Q
    xdt = _pad_and_chunk(xs * delta[..., None], pad, Q)                  # (b, c, Q, H, P): delta_s x_s
    a = _pad_and_chunk(delta * A.to(dtype), pad, Q)                      # (b, c, Q, H): log-decay per token
    Bc, Cc = _pad_and_chunk(B, pad, Q), _pad_and_chunk(C, pad, Q)        # (b, c, Q, G, N)
    n_chunks = xdt.shape[1]
    a = a.permute(0, 3, 1, 2)                                            # (b, H, c, Q)
    a_cum = a.cumsum(dim=-1)                                             # decay from chunk start to token t

    masks = _document_masks(seq_idx, pad, Q)

    # 1. Intra-chunk (quadratic) part: y_t = sum_s (C~_t . B~_s) * decay(s -> t) * delta_s x_s.
    decay_in_chunk = torch.exp(segment_sum(a, masks.same_doc_in_chunk))                  # (b, H, c, Q, Q)
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc).repeat_interleave(R, dim=2)     # (b, c, H, Q, Q)
    y = torch.einsum("bchts,bcshp->bcthp", scores * decay_in_chunk.transpose(1, 2), xdt)  # (b, c, Q, H, P)

    # 2. State of each chunk's own tokens at the chunk end (zero initial state).
    decay_to_end = _masked_exp(a_cum[..., -1:] - a_cum, masks.to_chunk_end)          # (b, H, c, Q)
    Bh = Bc.repeat_interleave(R, dim=3)                                                 # (b, c, Q, H, N)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bh, decay_to_end, xdt)      # (b, c, H, P, N)

    # 3. Pass states across chunks: state at boundary k = sum_{j<=k} decay(j -> k) * source_j, where source_0 is
    #    the initial state and source_j (j >= 1) the state of chunk j-1. Vectorized as a (c+1) x (c+1) matrix.
    if initial_state is None:
        initial_state = xs.new_zeros((b, H, P, N))
    sources = torch.cat((initial_state.to(dtype)[:, None], chunk_states), dim=1)      # (b, c+1, H, P, N)
    chunk_decay = F.pad(a_cum[..., -1], (1, 0))                                         # (b, H, c+1)
    decay_between = torch.exp(segment_sum(chunk_decay, masks.same_doc_boundaries))     # (b, H, c+1, c+1)
    boundary_states = torch.einsum("bhkj,bjhpn->bkhpn", decay_between, sources)       # (b, c+1, H, P, N)
    states_in, final_state = boundary_states[:, :-1], boundary_states[:, -1]

    # 4. Contribution of the state entering each chunk: y_t += decay(chunk start -> t) * S_in C~_t.
    decay_from_start = _masked_exp(a_cum, masks.from_chunk_start)                       # (b, H, c, Q)
    Ch = Cc.repeat_interleave(R, dim=3)                                                 # (b, c, Q, H, N)
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", Ch, states_in, decay_from_start)

    y = y.reshape(b, n_chunks * Q, H, P)[:, :l]
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y
