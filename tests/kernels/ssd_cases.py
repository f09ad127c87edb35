"""Shared by the SSD kernel tests: random inputs (never zero), RoPE tables in float64, document boundaries, errors."""

import torch

F64 = torch.float64


def rope_tables(positions: torch.Tensor, N: int, base: float = 10000.0):
    """cos/sin of shape positions.shape + (N//2,) with theta_i = base^(-2i/N), computed in float64."""
    inv_freq = base ** (-torch.arange(N // 2, dtype=F64) * 2 / N)
    angles = positions.to(F64)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def make_inputs(b, l, H, P, G, N, *, seed=0, dtype=F64, rope=True, per_batch_rope=False, options=True,
                seq_idx=None):
    """Random (never zero) arguments. options adds D, z, dt_bias + softplus and an initial state."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    args = dict(x=rand(b, l, H, P), B=rand(b, l, G, N) / N**0.25, C=rand(b, l, G, N) / N**0.25,
                A=-torch.exp(rand(H) * 0.5))  # A in about [-2.7, -0.4]
    kw = {}
    if options:
        args["dt"] = rand(b, l, H)
        kw.update(D=rand(H), z=rand(b, l, H, P), dt_bias=rand(H) * 0.5 - 1.0, dt_softplus=True,
                  initial_state=rand(b, H, P, N))
    else:
        args["dt"] = 0.05 + torch.rand(b, l, H, generator=g, dtype=F64) * 0.5  # positive: used as delta directly
    if rope:
        positions = torch.arange(l)
        if per_batch_rope:  # each sequence at its own offset, as after a document-position reset
            positions = positions[None] + torch.arange(b)[:, None] * 5
        kw["rope_cos"], kw["rope_sin"] = rope_tables(positions, N)
    if seq_idx is not None:
        kw["seq_idx"] = seq_idx
    args = {k: v.to(dtype) if k in ("x", "B", "C", "dt") else v for k, v in args.items()}
    if "z" in kw:
        kw["z"] = kw["z"].to(dtype)
    return args, kw


def docs(b, l, starts_per_batch):
    """seq_idx (b, l) int32 with a new document at each listed start."""
    seq = torch.zeros(b, l, dtype=torch.int32)
    for i, starts in enumerate(starts_per_batch):
        for s in starts:
            seq[i, s:] += 1
    return seq


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()
