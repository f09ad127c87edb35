"""One decoding step of SSD with Unified RoPE (the recurrent form, for generation after a prefill).

    y = rope_ssd_decode_step(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                             rope_cos=None, rope_sin=None)

    state (b, H, P, N)  fp32 (or float64), updated IN PLACE: h <- exp(delta A) h + delta x B~^T
    x     (b, H, P)     any float dtype; y (b, H, P) has x's dtype
    dt    (b, H)        raw; delta = softplus(dt + dt_bias) if dt_softplus else dt (+ dt_bias)
    A     (H,)          one scalar per head
    B, C  (b, G, N)     G divides H; head h uses group h // (H // G)
    D (H,), z (b, H, P), dt_bias (H,): as in the chunked form
    rope_cos, rope_sin: None or (b, N//2) or (N//2,): the table rows at each sequence's absolute position

Math in the state's dtype. Prefill with ssd_chunked_reference(..., return_final_state=True) over tokens 0..k-1,
then call this at positions k, k+1, ...: the outputs equal those of the full-sequence forward.
"""

import torch
import torch.nn.functional as F

from .naive import compute_delta
from .rope import apply_rope


def rope_ssd_decode_step(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                         rope_cos=None, rope_sin=None):
    """Advance `state` by one token and return that token's output y (b, H, P)."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (b, H, P), got {tuple(x.shape)}")
    b, H, P = x.shape
    if B.dim() != 3 or B.shape[0] != b:
        raise ValueError(f"B must have shape (b, G, N) with b={b}, got {tuple(B.shape)}")
    G, N = B.shape[1], B.shape[2]
    if G == 0 or H % G:
        raise ValueError(f"the number of B/C groups G={G} (B.shape[1]) must divide the number of heads H={H}")
    expected = {"state": (state, (b, H, P, N)), "C": (C, (b, G, N)), "dt": (dt, (b, H)), "A": (A, (H,)),
                "D": (D, (H,)), "z": (z, (b, H, P)), "dt_bias": (dt_bias, (H,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not state.is_floating_point() or state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be fp32 (or float64), got {state.dtype}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together (or both None)")

    dtype = state.dtype
    delta = compute_delta(dt, dt_bias, dt_softplus, dtype)                        # (b, H)
    B, C = B.to(dtype), C.to(dtype)
    if rope_cos is not None:
        for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if tuple(table.shape) not in ((b, N // 2), (N // 2,)):
                raise ValueError(f"{name} must have shape (b, N//2)=({b}, {N // 2}) or (N//2,), "
                                 f"got {tuple(table.shape)}")
        # Reuse the sequence rotation with l = 1.
        cos = rope_cos.to(dtype).expand(b, N // 2)[:, None]
        sin = rope_sin.to(dtype).expand(b, N // 2)[:, None]
        B = apply_rope(B[:, None], cos, sin)[:, 0]
        C = apply_rope(C[:, None], cos, sin)[:, 0]
    R = H // G
    B, C = B.repeat_interleave(R, dim=1), C.repeat_interleave(R, dim=1)          # (b, H, N)
    xs = x.to(dtype)

    decay = torch.exp(delta * A.to(dtype))                                          # (b, H)
    state.mul_(decay[:, :, None, None]).add_((delta[:, :, None] * xs)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
