"""rope_ssd (Triton, kernels/transxssm_kernels/rope_ssd/chunk.py) against ssd_naive (the float64 definition): forward, final state
and every gradient, on random inputs, through Triton's CPU interpreter at small shapes.

Tolerances (relative norm ||ours - ref|| / ||ref||): fp32 inputs 1e-3 (the interpreter computes fp32 dots exactly;
on a GPU they are tf32, ~3e-4), bf16/fp16 inputs 2e-2 (operands of every dot rounded to 8/11 bits; fp32 state).
The bf16 reference sees the same bf16-rounded inputs, upcast to float64.
"""

import dataclasses
import functools
import importlib
import os
import sys

import pytest
import torch

from transxssm_kernels.rope_ssd import LaunchConfig, ssd_naive

from ssd_cases import docs, rope_tables

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter tests; with CUDA see tests/gpu/test_rope_ssd_gpu.py")

F64 = torch.float64
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(scope="module", params=["walk", "chunks"])
def rope_ssd(request):
    """The Triton function, with its kernels built in interpreter mode (reloaded if imported before the env var),
    its state recurrence run by the walking scans or by the chunk-parallel kernels (LaunchConfig.scan_mode); every
    test runs with both."""
    names = ["transxssm_kernels.rope_ssd._triton_common", "transxssm_kernels.rope_ssd._fwd",
             "transxssm_kernels.rope_ssd._bwd", "transxssm_kernels.rope_ssd._states",
             "transxssm_kernels.rope_ssd._delta", "transxssm_kernels.rope_ssd.chunk"]
    from triton.runtime.interpreter import InterpretedFunction
    fwd = importlib.import_module(names[1])
    if not isinstance(fwd.chunk_output_kernel, InterpretedFunction):
        for n in names:
            importlib.reload(sys.modules[n]) if n in sys.modules else importlib.import_module(n)
    fn = importlib.import_module(names[-1]).rope_ssd

    def with_scan_mode(*args, launch=LaunchConfig(), **kwargs):
        return fn(*args, launch=dataclasses.replace(launch, scan_mode=request.param), **kwargs)
    return with_scan_mode


def tables(positions, N):
    """fp32 RoPE tables (the model computes them in fp32)."""
    return tuple(t.float() for t in rope_tables(positions, N))


def make_case(b, l, H, P, G, N, *, dtype, seed, rope="shared", options=False, seq_idx=None, init=False):
    """Random non-zero inputs: dict of differentiable tensors (in `dtype` where the model has it) + static kwargs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    t = dict(x=r(b, l, H, P).to(dtype), dt=(r(b, l, H) * 0.5 - 1.0).to(dtype), A=-torch.exp(r(H) * 0.5),
             B=(r(b, l, G, N) / N**0.25).to(dtype), C=(r(b, l, G, N) / N**0.25).to(dtype))
    kw = dict(dt_softplus=True)
    if options:
        t.update(D=r(H), z=r(b, l, H, P).to(dtype), dt_bias=r(H) * 0.5)
    if init:
        t["initial_state"] = r(b, H, P, N) * 0.5
    if rope == "shared":
        kw["rope_cos"], kw["rope_sin"] = tables(torch.arange(l) + 3, N)
    elif rope == "per_batch":
        kw["rope_cos"], kw["rope_sin"] = tables(torch.arange(l)[None] + 7 * torch.arange(b)[:, None], N)
    if seq_idx is not None:
        kw["seq_idx"] = seq_idx
    return t, kw


def run(fn, tensors, kw, *, cast=None, chunk_size, seed=123):
    """Forward with the final state, backward with random cotangents; returns {name: tensor} in float64."""
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_(True) for k, v in tensors.items()}
    kw = {k: (v.to(cast) if cast and torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    y, final = fn(**leaves, **kw, chunk_size=chunk_size, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    dfinal = torch.randn(final.shape, generator=g).to(final.dtype)
    ((y.to(F64) * dy.to(F64)).sum() + (final.to(F64) * dfinal.to(F64)).sum()).backward()
    out = {"y": y, "final_state": final}
    out.update({f"d{k}": v.grad for k, v in leaves.items()})
    return {k: v.detach().to(F64) for k, v in out.items()}


def check(rope_ssd, tensors, kw, *, dtype, chunk_size, reference=ssd_naive):
    ours = run(rope_ssd, tensors, kw, chunk_size=chunk_size)
    ref = run(reference, tensors, kw, cast=F64, chunk_size=chunk_size)
    errs = {k: ((ours[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}
    for k in ref:
        assert torch.isfinite(ours[k]).all(), f"{k} has non-finite values"
        assert ref[k].norm() > 0, f"reference {k} is zero: the test would prove nothing"
    print({k: f"{e:.1e}" for k, e in errs.items()})
    bad = {k: e for k, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]:g}: {bad} (all: {errs})"


# l is not a multiple of the chunk (the masked tail) except where a test says so (whole chunks: no masks, EVEN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_path(rope_ssd, dtype):
    """The model's path: RoPE, G = H, softplus(dt), no D/z/dt_bias, no seq_idx; 3 chunks + a partial one."""
    t, kw = make_case(2, 57, 2, 32, 2, 32, dtype=dtype, seed=1)
    check(rope_ssd, t, kw, dtype=dtype, chunk_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_rate_given_as_log(rope_ssd, dtype):
    """A given as log(-A), in the inputs' dtype (the SS mixer's A_log parameter; a_is_log): the kernels form
    A = -exp(A_log) and return d A_log; with dt_bias, whose gradient the same per-head kernel adds up."""
    t, kw = make_case(2, 57, 2, 32, 2, 32, dtype=dtype, seed=10)
    t["A_log"] = torch.log(-t.pop("A")).to(dtype)
    t["dt_bias"] = torch.tensor([0.2, -0.4])
    check(lambda A_log, **k: rope_ssd(A=A_log, a_is_log=True, **k), t, kw, dtype=dtype, chunk_size=16,
          reference=lambda A_log, **k: ssd_naive(A=-torch.exp(A_log), **k))


def test_fp16_groups_and_odd_P(rope_ssd):
    """fp16, G = 1 shared by 4 heads (dB, dC summed over heads), P = 48 (padded to 64 in the kernel), N = 64."""
    t, kw = make_case(1, 40, 4, 48, 1, 64, dtype=torch.float16, seed=2)
    check(rope_ssd, t, kw, dtype=torch.float16, chunk_size=32)


def test_all_options(rope_ssd):
    """D, z, dt_bias + softplus, seq_idx (document starts inside and on chunk edges), initial and final states,
    per-batch RoPE tables, G = 2 groups for 4 heads."""
    seq = docs(2, 50, [[5, 16, 33], [32]])
    t, kw = make_case(2, 50, 4, 16, 2, 32, dtype=torch.float32, seed=3, rope="per_batch", options=True,
                      seq_idx=seq, init=True)
    check(rope_ssd, t, kw, dtype=torch.float32, chunk_size=16)


def test_no_rope_larger_chunk(rope_ssd):
    """No rotation (the conv1d_d / none positional modes), chunk 64: one full chunk and a partial one."""
    t, kw = make_case(1, 70, 2, 16, 2, 32, dtype=torch.float32, seed=4, rope=None, init=True)
    check(rope_ssd, t, kw, dtype=torch.float32, chunk_size=64)


@pytest.mark.parametrize("l", [75, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_larger_than_inner_blocks(rope_ssd, dtype, l):
    """Two 32-row blocks per chunk of 64 walking 16-wide inner blocks (the layout of 256 / 64 / 32 on the GPU):
    the tiles off the chunk's diagonal (decay split at a pivot) and on it, with a document starting inside;
    l = 128 is whole chunks, where the tile kernels run without masks (EVEN). The state scans walk 16-row blocks
    too: several per chunk in their single loop, the state stored and decayed at each chunk's first."""
    launch = LaunchConfig(block_rows=32, block_inner_fwd=16, block_inner_dc=16, block_inner_dxdb=16,
                          block_scan_fwd=16, block_scan_bwd=16)
    seq = docs(1, l, [[40]])
    t, kw = make_case(1, l, 2, 16, 2, 32, dtype=dtype, seed=7, seq_idx=seq, init=True)
    check(functools.partial(rope_ssd, launch=launch), t, kw, dtype=dtype, chunk_size=64)


def test_strong_decay(rope_ssd):
    """cs falls by ~180 inside one chunk (A x 6), past fp32's exp range: the off-diagonal decay factors split at
    the pivot must each stay <= 1 (a pivot of 0 gives inf * 0 here) and the results match the float64 definition."""
    launch = LaunchConfig(block_rows=32, block_inner_fwd=16, block_inner_dc=16, block_inner_dxdb=16)
    t, kw = make_case(1, 64, 2, 16, 2, 32, dtype=torch.float32, seed=8)
    t["A"] = t["A"] * 6
    check(functools.partial(rope_ssd, launch=launch), t, kw, dtype=torch.float32, chunk_size=64)


@pytest.mark.parametrize("softplus", [False, True])
def test_delta_paths(rope_ssd, softplus):
    """delta = dt + dt_bias without softplus (positive dt), and softplus past its threshold (dt + dt_bias > 20 at a
    few tokens): the delta and d dt paths of _delta.py."""
    t, kw = make_case(1, 40, 2, 16, 2, 32, dtype=torch.float32, seed=9)
    t["dt_bias"] = torch.tensor([0.1, 0.3])
    if softplus:
        t["dt"][0, ::7, 0] = 21.0
    else:
        t["dt"] = t["dt"].abs() * 0.3
    kw["dt_softplus"] = softplus
    check(rope_ssd, t, kw, dtype=torch.float32, chunk_size=16)


@pytest.mark.parametrize("rounded_states", [True, False])
def test_bf16_options(rope_ssd, rounded_states):
    """bf16 with every option on, G = 1; the per-chunk states and their gradients stored in bf16 (the default) or
    fp32."""
    launch = LaunchConfig(states_in_input_dtype=rounded_states, dstates_in_input_dtype=rounded_states)
    seq = docs(1, 37, [[20]])
    t, kw = make_case(1, 37, 2, 16, 1, 32, dtype=torch.bfloat16, seed=5, options=True, seq_idx=seq, init=True)
    check(functools.partial(rope_ssd, launch=launch), t, kw, dtype=torch.bfloat16, chunk_size=16)


def test_bad_arguments(rope_ssd):
    t, kw = make_case(1, 8, 2, 16, 2, 32, dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="chunk_size"):
        rope_ssd(**t, **kw, chunk_size=48)
    with pytest.raises(ValueError, match="N/2"):
        rope_ssd(t["x"], t["dt"], t["A"], t["B"][..., :20], t["C"][..., :20], chunk_size=16)


def test_unknown_scan_mode_is_refused(rope_ssd):
    """LaunchConfig.scan_mode takes "walk", "chunks" or None; anything else is a one-line error naming the field."""
    fn = importlib.import_module("transxssm_kernels.rope_ssd.chunk").rope_ssd
    t, kw = make_case(1, 8, 2, 16, 2, 32, dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="scan_mode must be 'walk', 'chunks' or None"):
        fn(**t, **kw, chunk_size=16, launch=LaunchConfig(scan_mode="diagonal"))


def test_sequence_first_views(rope_ssd):
    """The SS mixer's call: x, B, C views of one sequence-first (l, b, H, P + 2N) tensor and dt a view of an (l, b, H)
    one, all transposed to (b, l, ...). y and every gradient equal the contiguous call's bit for bit, and y comes back
    sequence-first (so the mixer reshapes it without copying)."""
    b, l, H, P, N = 2, 40, 2, 16, 32
    t, kw = make_case(b, l, H, P, H, N, dtype=torch.float32, seed=10)
    packed = torch.cat([t["x"], t["B"], t["C"]], dim=-1).transpose(0, 1).contiguous().requires_grad_(True)
    dt_lb = t["dt"].transpose(0, 1).contiguous().requires_grad_(True)
    x, B, C = packed.split([P, N, N], dim=-1)
    bl = lambda v: v.transpose(0, 1)
    y = rope_ssd(bl(x), bl(dt_lb), t["A"], bl(B), bl(C), chunk_size=16, **kw)
    assert bl(y).is_contiguous(), f"y strides {y.stride()}: not sequence-first"
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11))
    (y * dy).sum().backward()

    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "dt", "B", "C")}
    y_ref = rope_ssd(leaves["x"], leaves["dt"], t["A"], leaves["B"], leaves["C"], chunk_size=16, **kw)
    (y_ref * dy).sum().backward()
    assert y_ref.abs().sum() > 0 and torch.equal(y, y_ref)
    assert torch.equal(bl(packed.grad), torch.cat([leaves[k].grad for k in ("x", "B", "C")], dim=-1))
    assert torch.equal(bl(dt_lb.grad), leaves["dt"].grad)


@pytest.mark.parametrize("heads_per_group", [1, 2])
def test_split_views_get_gradients_without_copy(rope_ssd, heads_per_group):
    """The SS mixer's split (fused_ops.split_last_dim) of a sequence-first projection into x, B, C: with G = H the
    kernels write the three gradients as views of one tensor and the split hands that tensor on as the
    projection's gradient (no concatenation); with G < H (dB, dC summed over heads) it concatenates. Either way
    the projection's gradient equals the contiguous call's."""
    from transxssm_megatron.model.fused_ops import split_last_dim

    b, l, G, P, N = 2, 40, 2, 16, 32
    H = G * heads_per_group
    t, kw = make_case(b, l, H, P, G, N, dtype=torch.float32, seed=12)
    per_group = torch.cat([t["x"].reshape(b, l, G, heads_per_group * P), t["B"], t["C"]], dim=-1)
    packed = per_group.transpose(0, 1).reshape(l, b, -1).contiguous().requires_grad_(True)
    proj = packed * 1.0                                        # a non-leaf, as in_proj's output is
    seen = {}
    proj.register_hook(lambda g: seen.setdefault("proj", g))
    x, B, C = split_last_dim(proj.view(l, b, G, -1), (heads_per_group * P, N, N))
    x.register_hook(lambda g: seen.setdefault("x", g))
    bl = lambda v: v.transpose(0, 1)
    y = rope_ssd(bl(x.reshape(l, b, H, P)), t["dt"], t["A"], bl(B), bl(C), chunk_size=16, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    (y * dy).sum().backward()

    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "B", "C")}
    y_ref = rope_ssd(leaves["x"], t["dt"], t["A"], leaves["B"], leaves["C"], chunk_size=16, **kw)
    (y_ref * dy).sum().backward()
    expected = torch.cat([leaves["x"].grad.reshape(b, l, G, -1), leaves["B"].grad, leaves["C"].grad], dim=-1)
    assert y_ref.abs().sum() > 0 and torch.equal(y, y_ref)
    assert torch.equal(packed.grad, bl(expected).reshape(l, b, -1))
    shared = seen["x"]._base is not None and seen["proj"].data_ptr() == seen["x"]._base.data_ptr()
    assert shared == (heads_per_group == 1), "the projection's gradient should be the kernels' own buffer iff G = H"


def test_rotate_bc_in_place(rope_ssd):
    """rotate_bc_in_place: with the chunk-parallel state recurrence, one head per group and bf16 whole chunks, the
    forward writes B~ and C~ over B and C (the chunk sums and chunk_output_tma_kernel) and the backward loads them
    as they are, unrotating only the gradients: every output and gradient against the float64 definition (2e-2),
    with documents inside a chunk and on a chunk edge, per-sequence tables and an initial state. The same call on
    views of one sequence-first projection (the SS mixer's) gives the same y and gradients bit for bit, and leaves
    the projection's B and C columns rotated. With the walking scans, or G < H, B and C stay as they were."""
    from transxssm_kernels.rope_ssd import apply_rope
    fn = importlib.import_module("transxssm_kernels.rope_ssd.chunk").rope_ssd
    b, l, H, P, N = 2, 128, 2, 16, 32
    blocks = dict(block_rows=32, block_inner_fwd=32, block_inner_dc=16, block_inner_dc_in_place=16, block_inner_dxdb=16)
    t, kw = make_case(b, l, H, P, H, N, dtype=torch.bfloat16, seed=14, rope="per_batch",
                      seq_idx=docs(b, l, [[0, 64], [0, 77]]), init=True)
    in_place = functools.partial(fn, rotate_bc_in_place=True, launch=LaunchConfig(scan_mode="chunks", **blocks))
    check(in_place, t, kw, dtype=torch.bfloat16, chunk_size=64)

    packed = torch.cat([t["x"], t["B"], t["C"]], dim=-1).transpose(0, 1).contiguous().requires_grad_(True)
    x, B, C = (v.transpose(0, 1) for v in packed.split([P, N, N], dim=-1))
    before = packed.detach().clone()
    rest = {k: t[k] for k in ("dt", "A", "initial_state")}
    y = in_place(x, B=B, C=C, **rest, **kw, chunk_size=64)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(15)).to(y.dtype)
    (y.float() * dy.float()).sum().backward()
    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "B", "C")}
    y_ref = in_place(leaves["x"], B=leaves["B"], C=leaves["C"], **rest, **kw, chunk_size=64)
    (y_ref.float() * dy.float()).sum().backward()
    assert y_ref.abs().sum() > 0 and torch.equal(y, y_ref)
    grads = torch.cat([leaves[k].grad for k in ("x", "B", "C")], dim=-1).transpose(0, 1)
    assert torch.equal(packed.grad, grads)
    cos, sin = (v.to(torch.bfloat16).float() for v in (kw["rope_cos"], kw["rope_sin"]))
    rotated = packed.detach().transpose(0, 1).split([P, N, N], dim=-1)
    originals = before.transpose(0, 1).split([P, N, N], dim=-1)
    assert torch.equal(rotated[0], originals[0]), "x must not change"
    for name, now, was in (("B", rotated[1], originals[1]), ("C", rotated[2], originals[2])):
        assert not torch.equal(now, was), f"{name} was not rotated in place"
        torch.testing.assert_close(now.float(), apply_rope(was.float(), cos, sin), rtol=1e-2, atol=1e-2)

    walk = functools.partial(fn, rotate_bc_in_place=True, launch=LaunchConfig(scan_mode="walk", **blocks))
    t2, kw2 = make_case(b, l, 4, P, 2, N, dtype=torch.bfloat16, seed=16)
    for call, tensors, kws in ((walk, t, kw), (in_place, t2, kw2)):
        B, C = tensors["B"].clone(), tensors["C"].clone()
        call(**tensors, **kws, chunk_size=64)
        assert torch.equal(tensors["B"], B) and torch.equal(tensors["C"], C)
