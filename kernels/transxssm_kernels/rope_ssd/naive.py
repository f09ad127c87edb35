"""SSD with Unified RoPE, step by step: the definition every other implementation is tested against.

    y = ssd_naive(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                  rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None, return_final_state=False)
    -> y  or  (y, final_state) when return_final_state

    x  (b, l, H, P)   any float dtype; y has x's dtype
    dt (b, l, H)      raw; delta = softplus(dt + dt_bias) if dt_softplus else dt (+ dt_bias if given)
    A  (H,)           negative (A = -exp(A_log)); one scalar per head
    B, C (b, l, G, N) G divides H; head h uses group h // (H // G)
    D  (H,) or None   skip: y += D[h] * x
    z  (b, l, H, P) or None   gate: y *= silu(z)   (applied after the D skip)
    rope_cos, rope_sin: None (no rotation) or (l, N//2) or (b, l, N//2); B and C are rotated with rotate_half
        (GPT-NeoX) pairing over N: a' = a*cos - b*sin ; b' = b*cos + a*sin   (a = first half, b = second half)
    seq_idx (b, l) int or None: document index per token, non-decreasing along l; the state is reset to zero where
        it changes (packed sequences). initial_state belongs to the document of the first token.
    initial_state (b, H, P, N) or None; final_state (b, H, P, N).

State math is fp32, or float64 when x is float64 (that is how the tests get 1e-10 agreement); final_state has that
dtype. Recurrence, one token at a time (h: P x N per head):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * x_t B~_t^T
    y_t = h_t C~_t (+ D x_t) (then * silu(z_t))

where B~, C~ are the rotated B, C. chunk_size is accepted for signature compatibility and ignored.

This file also holds the argument checks and the delta computation shared by the references.
"""

import torch
import torch.nn.functional as F

from .rope import apply_rope


def _shape_error(name: str, expected: str, expected_shape: tuple, got: torch.Tensor) -> ValueError:
    return ValueError(f"{name} must have shape {expected}={tuple(expected_shape)}, got {tuple(got.shape)}")


def check_ssd_inputs(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, rope_cos=None, rope_sin=None,
                     seq_idx=None, initial_state=None) -> tuple[int, int, int, int, int, int]:
    """Validate the shapes of the common SSD signature; return (b, l, H, P, G, N).

    Raises ValueError naming the argument and the shape it must have.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (b, l, H, P), got {tuple(x.shape)}")
    b, l, H, P = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must have shape (b, l, G, N) with (b, l)=({b}, {l}), got {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G == 0 or H % G:
        raise ValueError(f"the number of B/C groups G={G} (B.shape[2]) must divide the number of heads H={H}")
    if tuple(C.shape) != (b, l, G, N):
        raise _shape_error("C", "(b, l, G, N) like B", (b, l, G, N), C)
    if tuple(dt.shape) != (b, l, H):
        raise _shape_error("dt", "(b, l, H)", (b, l, H), dt)
    if tuple(A.shape) != (H,):
        raise ValueError(
            f"A must have shape (H,)=({H},): one scalar per head (Unified RoPE needs a scalar decay per head), "
            f"got {tuple(A.shape)}"
        )
    if D is not None and tuple(D.shape) != (H,):
        raise _shape_error("D", "(H,)", (H,), D)
    if dt_bias is not None and tuple(dt_bias.shape) != (H,):
        raise _shape_error("dt_bias", "(H,)", (H,), dt_bias)
    if z is not None and tuple(z.shape) != (b, l, H, P):
        raise _shape_error("z", "(b, l, H, P) like x", (b, l, H, P), z)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together (or both None)")
    if rope_cos is not None:
        if N % 2:
            raise ValueError(f"RoPE needs an even state size N, got N={N}")
        for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if tuple(table.shape) not in ((l, N // 2), (b, l, N // 2)):
                raise ValueError(
                    f"{name} must have shape (l, N//2)=({l}, {N // 2}) or (b, l, N//2)=({b}, {l}, {N // 2}), "
                    f"got {tuple(table.shape)}"
                )
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (b, l):
            raise _shape_error("seq_idx", "(b, l)", (b, l), seq_idx)
        if seq_idx.is_floating_point():
            raise ValueError(f"seq_idx must be an integer tensor (document index per token), got {seq_idx.dtype}")
        if l > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be non-decreasing along the sequence (one index per packed document)")
    if initial_state is not None and tuple(initial_state.shape) != (b, H, P, N):
        raise _shape_error("initial_state", "(b, H, P, N)", (b, H, P, N), initial_state)
    return b, l, H, P, G, N


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 state math for every input dtype; float64 inputs keep float64 (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def compute_delta(dt, dt_bias, dt_softplus: bool, dtype: torch.dtype) -> torch.Tensor:
    """delta (b, l, H) = softplus(dt + dt_bias) if dt_softplus else dt (+ dt_bias), in `dtype`."""
    delta = dt.to(dtype)
    if dt_bias is not None:
        delta = delta + dt_bias.to(dtype)
    return F.softplus(delta) if dt_softplus else delta


def rotate_and_expand(B, C, rope_cos, rope_sin, H: int, dtype: torch.dtype):
    """Cast B, C (b, l, G, N) to `dtype`, rotate them if tables are given; return them and heads-per-group R."""
    B, C = B.to(dtype), C.to(dtype)
    if rope_cos is not None:
        cos, sin = rope_cos.to(dtype), rope_sin.to(dtype)
        B, C = apply_rope(B, cos, sin), apply_rope(C, cos, sin)
    return B, C, H // B.shape[2]


def ssd_naive(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
              rope_cos=None, rope_sin=None, seq_idx=None, initial_state=None, return_final_state=False):
    """The recurrence of the module docstring, a Python loop over tokens. Slow; differentiable; the definition."""
    b, l, H, P, G, N = check_ssd_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, rope_cos=rope_cos,
                                        rope_sin=rope_sin, seq_idx=seq_idx, initial_state=initial_state)
    dtype = state_dtype(x)
    delta = compute_delta(dt, dt_bias, dt_softplus, dtype)            # (b, l, H)
    B, C, R = rotate_and_expand(B, C, rope_cos, rope_sin, H, dtype)
    B, C = B.repeat_interleave(R, dim=2), C.repeat_interleave(R, dim=2)  # (b, l, H, N): head h -> group h // R
    xs, A = x.to(dtype), A.to(dtype)

    if initial_state is None:
        h = x.new_zeros((b, H, P, N), dtype=dtype)
    else:
        h = initial_state.to(dtype)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)  # (b,): 0 where a new document starts
            h = h * same_doc[:, None, None, None]
        decay = torch.exp(delta[:, t] * A)                              # (b, H)
        h = decay[:, :, None, None] * h + (delta[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else xs.new_zeros((b, 0, H, P))   # (b, l, H, P)

    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y
