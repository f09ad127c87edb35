"""rope_ssd (Triton) on CUDA at real sizes against ssd_chunked_reference in float64 on the GPU: forward, final
state and every gradient, random inputs. Skipped without CUDA. Run on the GPU machine:

    python -m pytest tests/gpu/test_rope_ssd_gpu.py -q

Tolerances (relative norm): fp32 inputs 2e-3 (tf32 dots: 10-bit mantissa operands), bf16 2e-2, fp16 1e-2.
"""

import functools

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real-size kernel tests)")]

F64 = torch.float64
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def tables(positions, N):
    inv_freq = 10000.0 ** (-torch.arange(N // 2, dtype=F64, device=positions.device) * 2 / N)
    ang = positions.to(F64)[..., None] * inv_freq
    return ang.cos().float(), ang.sin().float()


def make_case(b, l, H, P, G, N, *, dtype, seed, options=False, seq_idx=None, init=False, rope=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    t = dict(x=r(b, l, H, P).to(dtype), dt=(r(b, l, H) * 0.5 - 2.0).to(dtype),
             A=-torch.exp(r(H) * 0.5 + 0.5), B=(r(b, l, G, N) / N**0.25).to(dtype),
             C=(r(b, l, G, N) / N**0.25).to(dtype))
    kw = dict(dt_softplus=True)
    if options:
        t.update(D=r(H), z=r(b, l, H, P).to(dtype), dt_bias=r(H) * 0.5)
    if init:
        t["initial_state"] = r(b, H, P, N) * 0.5
    if rope:
        kw["rope_cos"], kw["rope_sin"] = tables(torch.arange(l, device="cuda") + 11, N)
    if seq_idx is not None:
        kw["seq_idx"] = seq_idx
    return t, kw


def run(fn, tensors, kw, *, chunk_size, cast=None, seed=7):
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_(True) for k, v in tensors.items()}
    kw = {k: (v.to(cast) if cast and torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    y, final = fn(**leaves, **kw, chunk_size=chunk_size, return_final_state=True)
    g = torch.Generator(device="cuda").manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, device="cuda").to(y.dtype)
    dfinal = torch.randn(final.shape, generator=g, device="cuda").to(final.dtype)
    ((y.to(F64) * dy.to(F64)).sum() + (final.to(F64) * dfinal.to(F64)).sum()).backward()
    out = {"y": y, "final_state": final}
    out.update({f"d{k}": v.grad for k, v in leaves.items()})
    return {k: v.detach().to(F64) for k, v in out.items()}


def check(tensors, kw, *, dtype, chunk_size=256, launch=None):
    from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH, rope_ssd, ssd_chunked_reference
    ours = run(functools.partial(rope_ssd, launch=launch or DEFAULT_LAUNCH), tensors, kw, chunk_size=chunk_size)
    ref = run(ssd_chunked_reference, tensors, kw, chunk_size=chunk_size, cast=F64)
    errs = {k: ((ours[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}
    print({k: f"{e:.1e}" for k, e in errs.items()})
    for k in ref:
        assert torch.isfinite(ours[k]).all(), f"{k} has non-finite values"
        assert ref[k].norm() > 0, f"reference {k} is zero"
    bad = {k: e for k, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]:g}: {bad}"


def check_repeatable(tensors, kw, launch=None):
    """Two identical calls give the same output and gradients bit for bit."""
    from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH, rope_ssd
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items()}
    dy = None
    runs = []
    for _ in range(2):
        y = rope_ssd(**leaves, **kw, launch=launch or DEFAULT_LAUNCH)
        dy = torch.randn_like(y) if dy is None else dy
        runs.append([y.detach(), *torch.autograd.grad(y, list(leaves.values()), dy)])
    for name, a, b in zip(["y", *[f"d{k}" for k in leaves]], *runs):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


def scan(mode):
    from transxssm_kernels.rope_ssd import LaunchConfig
    return LaunchConfig(scan_mode=mode)


@pytest.mark.parametrize("mode", ["walk", "chunks"])
def test_repeatable(mode):
    """Same inputs, same output and gradients bit for bit (no race or atomic order between blocks), with the state
    recurrence walked or chunk-parallel (LaunchConfig.scan_mode)."""
    check_repeatable(*make_case(4, 4096, 32, 64, 32, 128, dtype=torch.bfloat16, seed=11), launch=scan(mode))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [128, 64])
@pytest.mark.parametrize("mode", ["walk", "chunks"])
def test_model_layer(dtype, N, mode):
    """The 1.3B SS layer: H = G = 32, P = 64, chunk 256, l = 4096 (b = 2), RoPE, softplus(dt); both ways of running
    the state recurrence."""
    t, kw = make_case(2, 4096, 32, 64, 32, N, dtype=dtype, seed=N)
    check(t, kw, dtype=dtype, launch=scan(mode))


def test_scan_modes_agree():
    """Every option (documents inside and on chunk edges, initial state, G = 4, chunk 128) in fp32 with each way of
    running the state recurrence, against the reference; and the two ways against each other: the same sums in
    another order (1e-4, where the reference tolerance is 2e-3)."""
    from transxssm_kernels.rope_ssd import rope_ssd
    seq = torch.zeros(1, 1500, dtype=torch.int32, device="cuda")
    seq[0, 300:] += 1
    seq[0, 640:] += 1
    t, kw = make_case(1, 1500, 8, 64, 4, 128, dtype=torch.float32, seed=23, options=True, seq_idx=seq, init=True)
    for mode in ("walk", "chunks"):
        check(t, kw, dtype=torch.float32, chunk_size=128, launch=scan(mode))
    a = run(functools.partial(rope_ssd, launch=scan("walk")), t, kw, chunk_size=128)
    b = run(functools.partial(rope_ssd, launch=scan("chunks")), t, kw, chunk_size=128)
    errs = {k: ((a[k] - b[k]).norm() / b[k].norm()).item() for k in a}
    print("walk vs chunks", {k: f"{e:.1e}" for k, e in errs.items()})
    assert all(e < 1e-4 for e in errs.values()), errs


def test_groups_fp16_odd_length():
    """G = 1 for 12 heads, fp16, l = 3000 (a partial last chunk), N = 128."""
    t, kw = make_case(2, 3000, 12, 64, 1, 128, dtype=torch.float16, seed=3)
    check(t, kw, dtype=torch.float16)


@pytest.mark.parametrize("chunk_size", [64, 128])
def test_all_options(chunk_size):
    """D, z, dt_bias, seq_idx (documents packed, starts inside and on chunk edges), initial + final state, G = 4."""
    b, l = 2, 1500
    seq = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    for i, starts in enumerate([[100, 256, 700, 1111], [512]]):
        for s in starts:
            seq[i, s:] += 1
    t, kw = make_case(b, l, 8, 64, 4, 128, dtype=torch.bfloat16, seed=5, options=True, seq_idx=seq, init=True)
    check(t, kw, dtype=torch.bfloat16, chunk_size=chunk_size)


@pytest.mark.parametrize("l", [4096, 4000])
def test_strong_decay_bf16(l):
    """A x 8 (cs falls by hundreds inside a chunk of 256): the off-diagonal decay factors split at the pivot stay
    finite; bf16 with the packed rotation; whole chunks (no masks) and a partial last chunk."""
    t, kw = make_case(1, l, 8, 64, 8, 128, dtype=torch.bfloat16, seed=12)
    t["A"] = t["A"] * 8
    check(t, kw, dtype=torch.bfloat16)


def test_no_rope_and_p32():
    t, kw = make_case(1, 2048, 4, 32, 4, 64, dtype=torch.float32, seed=9, rope=False, init=True)
    check(t, kw, dtype=torch.float32)


@pytest.mark.parametrize("cols", [16, 32, 64])
def test_scan_columns(cols):
    """Each width of the state scans' column blocks (chunk._scan_columns picks one by b*H), at the 1.3B layer
    (bf16, l = 4096, b = 2), then with every option (documents, initial state, G = 4) at chunk 128."""
    from transxssm_kernels.rope_ssd import LaunchConfig
    launch = LaunchConfig(scan_columns=cols)
    t, kw = make_case(2, 4096, 32, 64, 32, 128, dtype=torch.bfloat16, seed=21)
    check(t, kw, dtype=torch.bfloat16, launch=launch)
    seq = torch.zeros(1, 1500, dtype=torch.int32, device="cuda")
    seq[0, 300:] += 1
    seq[0, 640:] += 1
    t, kw = make_case(1, 1500, 8, 64, 4, 128, dtype=torch.bfloat16, seed=22, options=True, seq_idx=seq, init=True)
    check(t, kw, dtype=torch.bfloat16, chunk_size=128, launch=launch)


def test_narrow_half_tiles():
    """N = 64 with 32-wide half-column tiles (LaunchConfig.half_tile_min = 32, the default; 64 pads them to N = 128's
    tiles): the 1.3B layer in bf16 and fp32, every option at chunk 128, and bit-repeatability."""
    from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH
    assert DEFAULT_LAUNCH.half_tile_min == 32
    for dtype in (torch.bfloat16, torch.float32):
        t, kw = make_case(2, 4096, 32, 64, 32, 64, dtype=dtype, seed=41)
        check(t, kw, dtype=dtype)
    seq = torch.zeros(1, 1500, dtype=torch.int32, device="cuda")
    seq[0, 300:] += 1
    t, kw = make_case(1, 1500, 8, 64, 4, 64, dtype=torch.bfloat16, seed=42, options=True, seq_idx=seq, init=True)
    check(t, kw, dtype=torch.bfloat16, chunk_size=128)
    check_repeatable(*make_case(2, 4096, 32, 64, 32, 64, dtype=torch.bfloat16, seed=43))


def test_rotate_bc_in_place():
    """rope_ssd(..., rotate_bc_in_place=True) at the 1.3B layer in bf16 with documents and an initial state: the
    forward writes B~ and C~ over B and C (chunk sums, chunk_output_tma_kernel), the backward loads them without
    tables. Against the reference (2e-2) and against the call without it: the backward's dots see the same bf16 B~
    and C~ (gradients within 1e-3), y is summed in another order (2e-3). On views of one sequence-first projection
    (the SS mixer's call) y and the projection's gradient equal the contiguous call's bit for bit, and its B and C
    columns hold the rotated values afterwards."""
    from transxssm_kernels.rope_ssd import apply_rope, rope_ssd, ssd_chunked_reference

    b, l, H, P, N = 2, 4096, 32, 64, 128
    seq = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq[0, 1000:] += 1
    seq[1, 2048:] += 1
    t, kw = make_case(b, l, H, P, H, N, dtype=torch.bfloat16, seed=31, seq_idx=seq, init=True)
    in_place = functools.partial(rope_ssd, rotate_bc_in_place=True)
    ours = run(in_place, t, kw, chunk_size=256)
    plain = run(rope_ssd, t, kw, chunk_size=256)
    ref = run(ssd_chunked_reference, t, kw, chunk_size=256, cast=F64)
    to_ref = {k: ((ours[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}
    to_plain = {k: ((ours[k] - plain[k]).norm() / plain[k].norm()).item() for k in ref}
    print("in place vs reference", {k: f"{e:.1e}" for k, e in to_ref.items()})
    print("in place vs plain", {k: f"{e:.1e}" for k, e in to_plain.items()})
    assert all(e < TOL[torch.bfloat16] for e in to_ref.values()), to_ref
    assert to_plain["y"] < 2e-3 and all(e < 1e-3 for k, e in to_plain.items() if k != "y"), to_plain

    packed = torch.cat([t["x"], t["B"], t["C"]], dim=-1).transpose(0, 1).contiguous().requires_grad_(True)
    before = packed.detach().clone()
    x, B, C = (v.transpose(0, 1) for v in packed.split([P, N, N], dim=-1))
    rest = {k: t[k] for k in ("dt", "A", "initial_state")}
    y = in_place(x, B=B, C=C, **rest, **kw)
    dy = torch.randn_like(y)
    (y.float() * dy.float()).sum().backward()
    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "B", "C")}
    y_ref = in_place(leaves["x"], B=leaves["B"], C=leaves["C"], **rest, **kw)
    (y_ref.float() * dy.float()).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(packed.grad, torch.cat([leaves[k].grad for k in ("x", "B", "C")], dim=-1).transpose(0, 1))
    cos, sin = (v.to(torch.bfloat16).float() for v in (kw["rope_cos"], kw["rope_sin"]))
    now, was = (p_.transpose(0, 1).split([P, N, N], dim=-1) for p_ in (packed.detach(), before))
    assert torch.equal(now[0], was[0])
    for k in (1, 2):
        assert not torch.equal(now[k], was[k])
        torch.testing.assert_close(now[k].float(), apply_rope(was[k].float(), cos, sin), rtol=1e-2, atol=1e-2)
