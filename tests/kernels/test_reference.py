"""ssd_chunked_reference against ssd_naive (the definition), forward and every gradient, in float64.

Also: the definition itself against the SSD dual form and against running packed documents separately; low
precision inputs keep fp32 state math; Unified RoPE is invariant to a shift of all positions; clear shape errors.
"""

import pytest
import torch

from ssd_cases import F64, docs, make_inputs, rel_err, rope_tables

from transxssm_kernels.rope_ssd import apply_rope, ssd_chunked_reference, ssd_naive


def run_and_grads(fn, args, kw, chunk_size, seed=123):
    """y, final_state and the gradients of a random projection of both w.r.t. every floating tensor argument."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in {**args, **kw}.items()
              if torch.is_tensor(v) and v.is_floating_point()}
    call_args = {k: leaves.get(k, v) for k, v in args.items()}
    call_kw = {k: leaves.get(k, v) for k, v in kw.items()}
    y, state = fn(**call_args, **call_kw, chunk_size=chunk_size, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + \
        (state * torch.randn(state.shape, generator=g, dtype=state.dtype)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return y.detach(), state.detach(), dict(zip(names, grads))


CASES = {
    # name: (b, l, H, P, G, N, chunk, make_inputs kwargs)
    "l1": (2, 1, 4, 8, 2, 16, 16, dict()),
    "l15": (2, 15, 4, 8, 2, 16, 16, dict()),
    "l16": (2, 16, 4, 8, 2, 16, 16, dict()),
    "l37": (2, 37, 4, 8, 2, 16, 16, dict()),
    "l64": (2, 64, 4, 8, 2, 16, 16, dict()),
    "plain_G=H_no_rope": (2, 37, 4, 8, 4, 16, 16, dict(rope=False, options=False)),
    "G=1_no_options": (2, 37, 4, 8, 1, 16, 16, dict(options=False)),
    "G=H_per_batch_rope": (2, 37, 2, 8, 2, 16, 16, dict(per_batch_rope=True)),
    "N64": (1, 37, 2, 4, 2, 64, 16, dict()),
    "N128": (1, 37, 2, 4, 1, 128, 16, dict()),
    "one_chunk_256": (1, 40, 2, 4, 2, 16, 256, dict()),
    "chunk1": (2, 9, 2, 4, 1, 16, 1, dict(seq_idx=docs(2, 9, [[4], [1, 2]]))),
    # documents: boundaries inside chunks, on chunk edges (16, 32), a one-token document, one in the padded tail
    "docs_inside_and_on_edges": (2, 53, 4, 8, 2, 16, 16, dict(seq_idx=docs(2, 53, [[5, 16, 17, 40], [32, 52]]))),
    "docs_no_rope": (2, 37, 4, 8, 2, 16, 8, dict(rope=False, seq_idx=docs(2, 37, [[3, 8, 30], [1]]))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_naive_forward_and_every_gradient(case):
    b, l, H, P, G, N, chunk, opts = CASES[case]
    args, kw = make_inputs(b, l, H, P, G, N, seed=len(case), **opts)
    y_ref, s_ref, g_ref = run_and_grads(ssd_naive, args, kw, chunk)
    y, s, g = run_and_grads(ssd_chunked_reference, args, kw, chunk)
    assert y.dtype == F64 and s.dtype == F64 and y.shape == (b, l, H, P) and s.shape == (b, H, P, N)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10
    assert set(g) == set(g_ref) and {"x", "dt", "A", "B", "C"} <= set(g)
    for name in g_ref:
        assert g_ref[name].norm() > 0, f"gradient of {name} is zero: the test would not see a bug"
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


def test_empty_sequence_passes_the_state_through():
    args, kw = make_inputs(2, 0, 4, 8, 2, 16, seed=2, seq_idx=torch.zeros(2, 0, dtype=torch.int32))
    for fn in (ssd_naive, ssd_chunked_reference):
        y, state = fn(**args, **kw, return_final_state=True)
        assert y.shape == (2, 0, 4, 8) and torch.equal(state, kw["initial_state"])


def test_naive_matches_dual_form():
    """The definition against the dual form of docs/model.md §1 y_t = sum_s exp(A sum_{k=s+1..t} delta_k)(C~_t.B~_s) delta_s x_s."""
    b, l, H, P, G, N = 1, 7, 2, 3, 1, 8
    args, kw = make_inputs(b, l, H, P, G, N, seed=3, options=False)
    y = ssd_naive(**args, **kw)
    Bt = apply_rope(args["B"], kw["rope_cos"], kw["rope_sin"])[:, :, 0]
    Ct = apply_rope(args["C"], kw["rope_cos"], kw["rope_sin"])[:, :, 0]
    delta, A, x = args["dt"], args["A"], args["x"]
    expected = torch.zeros_like(y)
    for t in range(l):
        for s in range(t + 1):
            decay = torch.exp(A * delta[:, s + 1:t + 1].sum(dim=1))             # (b, H)
            weight = decay * (Ct[:, t] * Bt[:, s]).sum(-1)[:, None] * delta[:, s]
            expected[:, t] += weight[..., None] * x[:, s]
    assert rel_err(y, expected) < 1e-12


def test_packed_documents_equal_separate_runs():
    """With seq_idx, each document's output is that of the document run alone from a zero state."""
    b, l, H, P, G, N = 1, 30, 2, 4, 2, 16
    starts = [0, 9, 10, 30]
    args, kw = make_inputs(b, l, H, P, G, N, seed=5, seq_idx=docs(1, l, [starts[1:-1]]))
    kw.pop("initial_state")
    y = ssd_chunked_reference(**args, **kw, chunk_size=8)
    for lo, hi in zip(starts[:-1], starts[1:]):
        part = {k: v[:, lo:hi] for k, v in args.items() if k != "A"}
        part_kw = {k: (v[lo:hi] if k.startswith("rope") else v[:, lo:hi]) if k in ("z", "rope_cos", "rope_sin")
                   else v for k, v in kw.items() if k != "seq_idx"}
        y_alone = ssd_naive(**part, A=args["A"], **part_kw)
        assert rel_err(y[:, lo:hi], y_alone) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_low_precision_inputs_keep_fp32_state(dtype, tol):
    b, l, H, P, G, N = 2, 100, 4, 16, 2, 32
    args, kw = make_inputs(b, l, H, P, G, N, seed=11, dtype=dtype, seq_idx=docs(2, l, [[40], [70, 71]]))
    kw["rope_cos"], kw["rope_sin"] = kw["rope_cos"].float(), kw["rope_sin"].float()
    kw["initial_state"] = kw["initial_state"].float()
    kw["A"] = args.pop("A").float()
    y, state = ssd_chunked_reference(**args, **kw, chunk_size=32, return_final_state=True)
    assert y.dtype == dtype and state.dtype == torch.float32
    # Same (rounded) numbers in float64.
    up = lambda d: {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in d.items()}
    y64, state64 = ssd_naive(**up(args), **up(kw), return_final_state=True)
    assert rel_err(state.double(), state64) < 1e-5  # fp32 state math, whatever the input dtype
    assert rel_err(y.double(), y64) < tol


def test_fp32_long_chunk_with_strong_decay_is_accurate_and_finite():
    """Chunk 256 with log-decays summing to about -1e4 per chunk: no overflow, no NaN gradient, fp32 accuracy."""
    b, l, H, P, G, N = 1, 300, 2, 4, 2, 16
    args, kw = make_inputs(b, l, H, P, G, N, seed=9, dtype=torch.float32, seq_idx=docs(1, l, [[100]]))
    args["A"] = torch.tensor([-16.0, -0.01], dtype=F64)   # one head forgets at once, one barely decays
    args["dt"] = args["dt"] * 3
    up = lambda d: {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in d.items()}
    y64 = ssd_naive(**up(args), **up(kw))
    leaves = {k: v.float().requires_grad_(True) for k, v in args.items()}
    y = ssd_chunked_reference(**leaves, **{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                           for k, v in kw.items()}, chunk_size=256)
    assert rel_err(y.double(), y64) < 1e-5
    grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fn", [ssd_naive, ssd_chunked_reference], ids=["naive", "chunked"])
def test_rope_shift_invariance(fn):
    """Shifting every position by a constant leaves y unchanged (zero initial state); rotating does change y."""
    b, l, H, P, G, N = 2, 37, 2, 4, 2, 16
    args, kw = make_inputs(b, l, H, P, G, N, seed=7, seq_idx=docs(2, l, [[20], []]))
    kw.pop("initial_state")
    y = fn(**args, **kw, chunk_size=16)
    kw_shift = dict(kw)
    kw_shift["rope_cos"], kw_shift["rope_sin"] = rope_tables(torch.arange(l) + 1000, N)
    assert rel_err(fn(**args, **kw_shift, chunk_size=16), y) < 1e-10
    # Per-sequence shifts, given as (b, l, N//2) tables.
    kw_shift["rope_cos"], kw_shift["rope_sin"] = rope_tables(torch.arange(l)[None] + torch.tensor([[3], [12345]]), N)
    assert rel_err(fn(**args, **kw_shift, chunk_size=16), y) < 1e-10
    kw_none = {k: v for k, v in kw.items() if not k.startswith("rope")}
    assert rel_err(fn(**args, **kw_none, chunk_size=16), y) > 0.05


def test_shape_errors_name_the_argument():
    args, kw = make_inputs(2, 10, 4, 8, 2, 16, seed=1)
    for fn in (ssd_naive, ssd_chunked_reference):
        with pytest.raises(ValueError, match=r"A must have shape \(H,\)=\(4,\): one scalar per head"):
            fn(**{**args, "A": args["A"][:, None].expand(4, 16)}, **kw)
        with pytest.raises(ValueError, match=r"G=3 .* must divide .* H=4"):
            fn(**{**args, "B": args["B"][:, :, :1].expand(2, 10, 3, 16), "C": args["C"][:, :, :1].expand(2, 10, 3, 16)})
        with pytest.raises(ValueError, match=r"^C must have shape"):
            fn(**{**args, "C": args["C"][..., :8]})
        with pytest.raises(ValueError, match=r"^dt must have shape \(b, l, H\)=\(2, 10, 4\)"):
            fn(**{**args, "dt": args["dt"][..., :2]})
        with pytest.raises(ValueError, match=r"^rope_cos must have shape \(l, N//2\)=\(10, 8\)"):
            fn(**args, rope_cos=kw["rope_cos"][:, :4], rope_sin=kw["rope_sin"])
        with pytest.raises(ValueError, match=r"^initial_state must have shape"):
            fn(**args, initial_state=kw["initial_state"][..., :8])
        with pytest.raises(ValueError, match=r"seq_idx must be non-decreasing"):
            fn(**args, seq_idx=docs(2, 10, [[3], [4]]).flip(1))
