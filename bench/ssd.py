"""Benchmark: the SS mixer's SSD with Unified RoPE, ours fused vs. composed from parts vs. attention (one H200).

    python bench/ssd.py --out bench/results/ssd-<date>.json [--mamba-path DIR] [--quick]
(with the project installed: `pip install .`, or a wheel built from the tree)

Methods, each timed forward and forward+backward (median of triton.testing.do_bench, CUDA events):
  fused      transxssm_kernels.rope_ssd (B, C rotated on load)
  eager      PyTorch eager RoPE on B and C, then mamba_ssm's mamba_chunk_scan_combined
  compiled   torch.compile'd RoPE, then the same
  mamba      mamba_chunk_scan_combined without RoPE
  sdpa       PyTorch SDPA causal attention, the same heads (head dim 64), q/k/v given
Grid: H in {32 (1.3B), 12 (320M)}, P = 64, N in {64, 128}, G = H, l in {4096, 8192, 16384}, b = 32768 / l; bf16
inputs, fp32 RoPE tables, softplus(dt), chunk 256. Also measured in the same run: device copy bandwidth and bf16
matmul rate (the ceilings), the bytes / FLOPs each call must move / do (see docs/kernels.md), and the host (CPU)
time per forward+backward call of ours and SDPA: where it exceeds the GPU time, the timing measures the launches.
mamba_ssm is a comparison only: its Triton modules are loaded from --mamba-path without its package __init__.
"""

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from transxssm_kernels.rope_ssd import rope_ssd

from run_record import commit  # noqa: E402  (bench/ is the script's folder)

TOKENS = 32768
DT = torch.bfloat16


def load_mamba(path):
    """Import mamba_ssm.ops.triton.ssd_combined from an unpacked wheel without running mamba_ssm/__init__.py
    (it imports CUDA extensions that are not built)."""
    if not path:
        return None
    for name, sub in (("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton"),
                      ("mamba_ssm.utils", "utils")):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(path, "mamba_ssm", sub)]
        sys.modules[name] = mod
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def rope_eager(t, cos, sin):
    """rotate_half RoPE the usual PyTorch way: t (b, l, G, N) bf16, tables (l, N/2) fp32 -> bf16."""
    a, b = t.chunk(2, dim=-1)
    cos = torch.cat((cos, cos), -1)[None, :, None, :]
    sin = torch.cat((sin, sin), -1)[None, :, None, :]
    rot = torch.cat((-b, a), -1)
    return (t.float() * cos + rot.float() * sin).to(t.dtype)


rope_compiled = torch.compile(rope_eager, dynamic=True)


def ceilings():
    n = 1 << 30  # 1 GiB bf16 elements -> 2 GiB, read + written
    src = torch.randn(n // 2, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_bytes_per_s": bw, "bf16_matmul_flop_per_s": 2 * 8192**3 / (ms * 1e-3)}


def ssd_cost(b, l, H, P, N, Q=256):
    """Least bytes (each input read once, each output written once) and chunked-SSD FLOPs, fwd and fwd+bwd."""
    th = b * l * H
    e = 2  # bf16
    fwd_bytes = th * (P * e * 2 + 2 * N * e + e) + 2 * l * N // 2 * 4      # x, y, B, C, dt; cos/sin tables
    bwd_bytes = th * (P * e * 2 + 2 * N * e + e + P * e * 2 + 2 * N * e + e)  # x, dy, B, C, dt + dx, dB, dC, ddt
    # per token and head: causal half of C B^T (Q/2 * N) and of (CB) x (Q/2 * P), chunk state and output from
    # the state (P*N each); multiply-add = 2 FLOPs. Backward: every product's two operand gradients.
    fwd_flops = th * 2 * (Q // 2 * N + Q // 2 * P + 2 * P * N)
    return {"fwd_bytes": fwd_bytes, "fwdbwd_bytes": fwd_bytes + bwd_bytes,
            "fwd_flops": fwd_flops, "fwdbwd_flops": 3 * fwd_flops}


def sdpa_cost(b, l, H, d=64):
    fwd = 4 * b * H * l * l * d / 2   # QK^T and PV, causal half
    return {"fwd_flops": fwd, "fwdbwd_flops": 3.5 * fwd}


TIMING = {"warmup": 25, "rep": 100}   # milliseconds, as do_bench takes them; --fast lowers them


def bench(fn, grads):
    return do_bench(fn, grad_to_none=grads, return_mode="median", **TIMING)


def host_ms(fn, grads, calls=20):
    """CPU time per call of fn in ms (the fastest of three bursts of `calls`, no synchronisation inside a burst): the
    launch cost. A call whose kernels take less GPU time than this is timed by the CPU, not the GPU."""
    def call():
        for t in grads or ():
            t.grad = None
        fn()
    for _ in range(3):
        call()
    bursts = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        bursts.append((time.perf_counter() - start) / calls * 1e3)
    torch.cuda.synchronize()
    return min(bursts)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer_inputs(H, N, l, P=64, seed=None, device="cuda", batch=None):
    """Random bf16 inputs of one SS layer (G = H) at `batch` sequences (default: 32K tokens), the output gradient and
    fp32 RoPE tables over N.

    Returns x, dt, A, B, C (leaves needing grad), dy, cos, sin."""
    b = batch or TOKENS // l
    g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    r = lambda *s: torch.randn(*s, generator=g, device=device)
    x = r(b, l, H, P).to(DT).requires_grad_()
    dt = (r(b, l, H) * 0.5 - 2.0).to(DT).requires_grad_()
    A = (-torch.exp(r(H) * 0.5 + 0.5)).requires_grad_()
    B = (r(b, l, H, N) / N**0.25).to(DT).requires_grad_()
    C = (r(b, l, H, N) / N**0.25).to(DT).requires_grad_()
    dy = r(b, l, H, P).to(DT)
    inv = 10000.0 ** (-torch.arange(N // 2, device=device, dtype=torch.float32) * 2 / N)
    ang = torch.arange(l, device=device, dtype=torch.float32)[:, None] * inv
    return x, dt, A, B, C, dy, ang.cos(), ang.sin()


def run_shape(H, N, l, mamba, P=64):
    b = TOKENS // l
    G = H
    x, dt, A, B, C, dy, cos, sin = layer_inputs(H, N, l, P, seed=0)
    leaves = [x, dt, A, B, C]

    methods = {"fused": lambda: rope_ssd(x, dt, A, B, C, chunk_size=256, dt_softplus=True, rope_cos=cos,
                                         rope_sin=sin),
               "fused_chunk128": lambda: rope_ssd(x, dt, A, B, C, chunk_size=128, dt_softplus=True, rope_cos=cos,
                                                  rope_sin=sin)}
    if mamba is not None:
        methods["eager"] = lambda: mamba(x, dt, A, rope_eager(B, cos, sin), rope_eager(C, cos, sin), 256,
                                         dt_softplus=True)
        methods["compiled"] = lambda: mamba(x, dt, A, rope_compiled(B, cos, sin), rope_compiled(C, cos, sin), 256,
                                            dt_softplus=True)
        methods["mamba"] = lambda: mamba(x, dt, A, B, C, 256, dt_softplus=True)
    out = {"H": H, "P": P, "N": N, "G": G, "l": l, "b": b, "cost": ssd_cost(b, l, H, P, N), "ms": {}}

    # agreement with the composed implementation at this size, output and every gradient (bf16 both; a sanity
    # check of the configuration timed here, beside the float64 tests of tests/gpu)
    if mamba is not None:
        res = {}
        for name in ("fused", "eager"):
            for t in leaves:
                t.grad = None
            y = methods[name]()
            y.backward(dy)
            res[name] = [y.detach()] + [t.grad.detach().clone() for t in leaves]
        out["rel_diff_fused_vs_eager"] = {k: rel(a, b) for k, a, b in zip(
            ("y", "dx", "ddt", "dA", "dB", "dC"), res["fused"], res["eager"])}
        for t in leaves:
            t.grad = None

    out["host_ms"] = {}
    for name, f in methods.items():
        fwd = bench(lambda: f(), None)
        fb = bench(lambda: f().backward(dy), leaves)
        out["ms"][name] = {"fwd": fwd, "fwdbwd": fb}
        out["host_ms"][name] = {"fwdbwd": host_ms(lambda: f().backward(dy), leaves)}
    # attention with the same heads: q, k, v (b, H, l, 64)
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q, k, v = (r(b, H, l, 64).to(DT).requires_grad_() for _ in range(3))
    dya = r(b, H, l, 64).to(DT)
    att = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out["ms"]["sdpa"] = {"fwd": bench(att, None), "fwdbwd": bench(lambda: att().backward(dya), [q, k, v])}
    out["host_ms"]["sdpa"] = {"fwdbwd": host_ms(lambda: att().backward(dya), [q, k, v])}
    out["sdpa_cost"] = sdpa_cost(b, l, H)
    return out


# Layouts of the fused kernel: each a LaunchConfig (overrides of DEFAULT_LAUNCH, see launch_of) plus "shape"
# ((H, N, l) at 32K tokens, or (H, N, l, b); default the 1.3B layer), "chunk" (the chunk size) and "prerotated" (B, C
# rotated before the call, no tables). The first is the shipped default; --variants
# times them all (and the kernels of --baseline-kernels, if given).
VARIANTS = {
    "default": {},
    "chunk128": dict(chunk=128),
    # alternatives to the shipped settings (LaunchConfig fields, or a KernelOptions field of one kernel written
    # kernel.option), each measured slower on the H200 (docs/kernels.md); "shape" times the default elsewhere
    "out inner32": dict(block_inner_fwd=32),
    "out stages2": {"output.num_stages": 2},
    "out w8": {"output.num_warps": 8},
    "out maxnreg168": {"output.maxnreg": 168},
    "dc inner64": dict(block_inner_dc=64),
    "dc stages2": {"dc.num_stages": 2},
    "dc w8": {"dc.num_warps": 8},
    "dxdb inner16": dict(block_inner_dxdb=16),
    "dxdb inner32": dict(block_inner_dxdb=32),
    "dxdb stages2": {"dxdb.num_stages": 2},
    "dxdb stages3": {"dxdb.num_stages": 3},
    "dxdb w8": {"dxdb.num_warps": 8},
    "dxdb maxnreg168": {"dxdb.maxnreg": 168},
    "scan cols32": dict(scan_columns=32),
    "scan w8": {"scan_fwd.num_warps": 8, "scan_bwd.num_warps": 8},
    "scan stages2/1": {"scan_fwd.num_stages": 2, "scan_bwd.num_stages": 1},
    "scan stages2/2": {"scan_fwd.num_stages": 2, "scan_bwd.num_stages": 2},
    "scan stages3/4": {"scan_bwd.num_stages": 4},
    "scan rows64/32 stages3/3": dict(block_scan_bwd=32),
    "scan rows64/32 stages3/5": {"block_scan_bwd": 32, "scan_bwd.num_stages": 5},
    "scan rows32/32 stages5/5": {"block_scan_fwd": 32, "block_scan_bwd": 32, "scan_fwd.num_stages": 5,
                                 "scan_bwd.num_stages": 5},
    "scan rows32/16 stages5/6": {"block_scan_fwd": 32, "block_scan_bwd": 16, "scan_fwd.num_stages": 5,
                                 "scan_bwd.num_stages": 6},
    "states fp32": dict(states_in_input_dtype=False),
    "states+dstates fp32": dict(states_in_input_dtype=False, dstates_in_input_dtype=False),
    "320M layer": dict(shape=(12, 128, 4096)),   # the default settings at the 320M layer's shape (for --profile)
    # the state recurrence walked or chunk-parallel (scan_mode) at the batch sizes of the training runs
    # (shape (H, N, l, b)): the 1.3B layer at 2 x 4K, 1 x 32K and 8 x 4K tokens, the 320M one at 4 x 4K and 1 x 16K
    **{f"scan {mode} {name}": dict(shape=shape, scan_mode=mode) for mode in ("walk", "chunks")
       for name, shape in {"1.3B b2": (32, 128, 4096, 2), "1.3B b1 l32K": (32, 128, 32768, 1),
                           "1.3B b8": (32, 128, 4096, 8), "320M b4": (12, 128, 4096, 4),
                           "320M b1 l16K": (12, 128, 16384, 1)}.items()},
    **{f"scan chunks 1.3B b2 {name}": dict(shape=(32, 128, 4096, 2), scan_mode="chunks", **v) for name, v in {
        "pass512": dict(pass_block=512), "pass2048": dict(pass_block=2048),
        "pass stages1": {"state_pass.num_stages": 1},
        "sums stages1": {"chunk_sums.num_stages": 1}, "sums stages3": {"chunk_sums.num_stages": 3},
        "sums w8": {"chunk_sums.num_warps": 8}, "sums rows32": dict(block_scan_fwd=32, block_scan_bwd=32),
        "sums stages3 pass512": {"chunk_sums.num_stages": 3, "pass_block": 512}}.items()},
    **{f"scan chunks {name} sums stages{k}": dict(shape=shape, scan_mode="chunks", **{"chunk_sums.num_stages": k})
       for name, shape in {"1.3B b8": (32, 128, 4096, 8), "1.3B b1 l32K": (32, 128, 32768, 1),
                           "320M b4": (12, 128, 4096, 4)}.items() for k in (1, 3)},
    **{f"N64 half-tiles{w} H{H} l{l}": dict(shape=(H, 64, l), half_tile_min=w)
       for H in (32, 12) for l in (4096, 16384) for w in (64, 32)},
    # B and C rotated before the call by a compiled PyTorch pass (and their gradients rotated back by its backward),
    # the kernels run without tables: what rotating once outside would save inside the kernels, and cost (--profile)
    **{f"prerotated {name}": dict(shape=shape, prerotated=True)
       for name, shape in {"1.3B": (32, 128, 4096), "1.3B b2": (32, 128, 4096, 2)}.items()},
    "default 1.3B b2": dict(shape=(32, 128, 4096, 2)),
    # B and C rotated in place by the forward's kernels (rope_ssd's rotate_bc_in_place, the SS mixer's call) at the
    # training runs' batch shapes: the chunk-parallel state recurrence, where it applies
    **{f"in place {name}": dict(shape=shape, in_place=True)
       for name, shape in {"1.3B b2": (32, 128, 4096, 2), "1.3B b1 l32K": (32, 128, 32768, 1),
                           "320M b4": (12, 128, 4096, 4)}.items()},
    # the backward's inner blocks re-chosen for B and C rotated in place (no rotation in dc and dxdb)
    **{f"in place {name} {tag}": dict(shape=shape, in_place=True, **v)
       for name, shape in {"1.3B b2": (32, 128, 4096, 2), "320M b4": (12, 128, 4096, 4)}.items()
       for tag, v in {"dc inner64": dict(block_inner_dc=64), "dxdb inner32": dict(block_inner_dxdb=32),
                      "dc inner64 dxdb inner32": dict(block_inner_dc=64, block_inner_dxdb=32)}.items()},
    **{f"default {name}": dict(shape=shape) for name, shape in {"1.3B b1 l32K": (32, 128, 32768, 1),
                                                                "320M b4": (12, 128, 4096, 4)}.items()},
    # 128-row tiles with 8 warps (two warpgroups) in chunk_output, dc and dxdb: slower too (docs/kernels.md)
    "rows128 w8 1.3B b2": {"shape": (32, 128, 4096, 2), "block_rows": 128, "output.num_warps": 8,
                           "dc.num_warps": 8, "dxdb.num_warps": 8},
    "rows128 w8 inner128 1.3B b2": {"shape": (32, 128, 4096, 2), "block_rows": 128, "block_inner_fwd": 128,
                                    "block_inner_dc": 64, "block_inner_dxdb": 128, "output.num_warps": 8,
                                    "dc.num_warps": 8, "dxdb.num_warps": 8},
}


def layout_operands(overrides, B, C, cos, sin):
    """(B, C, keywords) a layout passes to rope_ssd: B and C rotated here and no tables when "prerotated"; with
    "in_place" the kernels rotate B and C in place, once more at every call (values that leave the timings as they
    are, and no copy in them)."""
    if overrides.get("prerotated"):
        return rope_compiled(B, cos, sin), rope_compiled(C, cos, sin), {}
    in_place = {"rotate_bc_in_place": True} if overrides.get("in_place") else {}
    return B, C, dict(rope_cos=cos, rope_sin=sin, **in_place)


def launch_of(overrides):
    """The LaunchConfig of a variant: DEFAULT_LAUNCH with its overrides ("kernel.option" for KernelOptions)."""
    from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH

    fields, kernels = {}, {}
    for key, value in overrides.items():
        if key in ("chunk", "shape", "prerotated", "in_place"):
            continue
        kernel, _, option = key.partition(".")
        if option:
            kernels.setdefault(kernel, {})[option] = value
        else:
            fields[key] = value
    for kernel, options in kernels.items():
        fields[kernel] = dataclasses.replace(getattr(DEFAULT_LAUNCH, kernel), **options)
    return dataclasses.replace(DEFAULT_LAUNCH, **fields)


def load_baseline(path):
    """rope_ssd of another checkout's kernels/ folder (e.g. the previous commit), imported as `baseline_kernels`."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("baseline_kernels", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("baseline_kernels.rope_ssd").rope_ssd


def variant_inputs(shape, P):
    """layer_inputs of a variant's shape: (H, N, l) at 32K tokens or (H, N, l, b)."""
    return layer_inputs(*shape[:3], P, batch=shape[3] if len(shape) > 3 else None)


def time_variants(P=64, baseline=None, matching="", rounds=1):
    """ms of fused fwd / fwd+bwd for each of VARIANTS (and the baseline kernels) at its shape (the 1.3B layer unless
    the variant names one), those whose name contains one of the '|'-separated texts of `matching`, `rounds` times
    in turn; leaves the default."""
    inputs = {}
    runs = [(name, v, functools.partial(rope_ssd, launch=launch_of(v))) for name, v in VARIANTS.items()
            if name == "default" or any(m in name for m in matching.split("|"))]
    if baseline is not None:   # another checkout's kernels, with their own defaults
        runs.insert(0, ("baseline", {}, baseline))
    runs = [(name + (f" #{k + 1}" if k else ""), v, fn) for k in range(rounds) for name, v, fn in runs]
    out = {}
    for name, overrides, fn in runs:
        shape = overrides.get("shape", (32, 128, 4096))
        if shape not in inputs:
            inputs[shape] = variant_inputs(shape, P)
        x, dt, A, B, C, dy, cos, sin = inputs[shape]
        Q = overrides.get("chunk", 256)
        def f():
            Bl, Cl, tables = layout_operands(overrides, B, C, cos, sin)
            return fn(x, dt, A, Bl, Cl, chunk_size=Q, dt_softplus=True, **tables)
        try:
            out[name] = {"fwd": bench(f, None), "fwdbwd": bench(lambda: f().backward(dy), [x, dt, A, B, C])}
        except Exception as e:  # a layout that fails to compile or run is reported, not fatal
            out[name] = {"error": repr(e)[:300]}
        print("variant", name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out[name].items()},
              flush=True)
    return out


def profile_fused(P=64, steps_only=False, variant="default"):
    """Print the CUDA time of each kernel of one fused forward+backward (torch.profiler) of a layout at its shape and
    chunk, after warm-up."""
    overrides = VARIANTS[variant]
    launch = launch_of(overrides)
    x, dt, A, B, C, dy, cos, sin = variant_inputs(overrides.get("shape", (32, 128, 4096)), P)
    Q = overrides.get("chunk", 256)
    def step():
        x.grad = dt.grad = A.grad = B.grad = C.grad = None   # no gradient-accumulation kernels in the profile
        Bl, Cl, tables = layout_operands(overrides, B, C, cos, sin)
        rope_ssd(x, dt, A, Bl, Cl, chunk_size=Q, dt_softplus=True, launch=launch, **tables).backward(dy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if steps_only:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"profile of layout {variant!r}, 5 steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    per_step = {e.key: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 5e3
                for e in prof.key_averages()}
    kernels = {k: round(v, 4) for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"gpu_ms_per_fwdbwd": round(sum(v for k, v in kernels.items() if not k.startswith("aten::")), 4),
            "kernels_ms": kernels}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mamba-path", default=None, help="folder holding an unpacked mamba_ssm wheel")
    ap.add_argument("--quick", action="store_true", help="only the 1.3B N=128 l=4096 shape")
    ap.add_argument("--profile", nargs="*", metavar="LAYOUT", default=None,
                    help="per-kernel times of fused fwd+bwd for these VARIANTS names, each at its shape (default: "
                    "the default layout, 1.3B N=128 l=4096)")
    ap.add_argument("--baseline-kernels", default=None, metavar="DIR",
                    help="another checkout's kernels/ folder, timed beside the variants as 'baseline'")
    ap.add_argument("--variants", action="store_true", help="time variants of the fused kernel, 1.3B N=128 l=4096")
    ap.add_argument("--variants-matching", default="", metavar="TEXT",
                    help="only the variants whose name contains TEXT, or one of TEXT's '|'-separated parts (the "
                         "default layout is always timed)")
    ap.add_argument("--variants-rounds", type=int, default=1, metavar="K",
                    help="time the variants K times in turn (run-to-run spread; rounds after the first get #k)")
    ap.add_argument("--ncu-step", action="store_true", help="run one fused fwd+bwd only (for ncu), then exit")
    ap.add_argument("--part", default="1/1", help="K/N: measure every N-th shape of the grid from the K-th (1-based), "
                    "to spread the grid over N GPUs")
    ap.add_argument("--fast", action="store_true", help="shorter timing windows (5 ms warm-up, 30 ms repeats)")
    ap.add_argument("--shapes", default=None, metavar="HxNxL,...",
                    help="only these shapes of the grid, e.g. 32x128x4096,12x64x8192")
    ap.add_argument("--mamba-shapes", default=None, metavar="HxNxL,...",
                    help="time (b)-(d) (mamba_ssm) only at these shapes (default: every shape, with --mamba-path)")
    args = ap.parse_args()
    mamba = load_mamba(args.mamba_path)
    if args.ncu_step:
        profile_fused(steps_only=True)
        return
    profiles = {}
    if args.profile is not None:
        for name in args.profile or ["default"]:
            profiles[name] = profile_fused(variant=name)
        print("GPU ms per forward+backward (kernels only, torch.profiler):")
        for name, p in profiles.items():
            print(f"  {p['gpu_ms_per_fwdbwd']:7.3f}  {name}")
    if args.fast:
        TIMING.update(warmup=5, rep=30)
    baseline = load_baseline(args.baseline_kernels) if args.baseline_kernels else None
    variants = time_variants(baseline=baseline, matching=args.variants_matching,
                             rounds=args.variants_rounds) if args.variants else None

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "command": " ".join([sys.executable] + sys.argv),
        "ceilings": ceilings(), "shapes": [], "variants_1p3b_n128_l4096": variants, "profiles": profiles or None,
        "timing_ms": dict(TIMING),
    }
    # the 1.3B target shape first, then the rest: each shape is saved as soon as it is measured
    grid = [(32, 128, 4096)] if args.quick else [
        (32, 128, 4096), (12, 128, 4096), (32, 128, 8192), (32, 128, 16384), (32, 64, 4096), (12, 64, 4096),
        (12, 128, 8192), (12, 128, 16384), (32, 64, 8192), (32, 64, 16384), (12, 64, 8192), (12, 64, 16384)]
    parse = lambda text: [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    if args.shapes:
        grid = parse(args.shapes)
    k, n = (int(v) for v in args.part.split("/"))
    grid = grid[k - 1::n]
    mamba_at = set(parse(args.mamba_shapes)) if args.mamba_shapes else None
    bw = result["ceilings"]["copy_bytes_per_s"]
    mm = result["ceilings"]["bf16_matmul_flop_per_s"]
    for H, N, l in grid:
        s = run_shape(H, N, l, mamba if mamba_at is None or (H, N, l) in mamba_at else None)
        c, f = s["cost"], s["ms"]["fused"]
        floor = {m: max(c[m + "_bytes"] / bw, c[m + "_flops"] / mm) * 1e3 for m in ("fwd", "fwdbwd")}
        s["floor_ms"] = floor
        s["fraction_of_floor"] = {m: floor[m] / f[m] for m in floor}
        result["shapes"].append(s)
        print(json.dumps({k: s[k] for k in ("H", "N", "l", "ms", "host_ms", "rel_diff_fused_vs_eager") if k in s}),
              flush=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        torch.cuda.empty_cache()

    print(f"\nceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s; "
          f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}")
    print("ms per 32K tokens (fwd / fwd+bwd); x = time / fused time")
    hdr = f"{'H':>3} {'N':>4} {'l':>6} | {'fused':>11} | {'floor':>11} | " + " | ".join(
        f"{m:>16}" for m in ("fused_chunk128", "eager", "compiled", "mamba", "sdpa"))
    print(hdr)
    for s in result["shapes"]:
        ms, fu = s["ms"], s["ms"]["fused"]
        cells = []
        for m in ("fused_chunk128", "eager", "compiled", "mamba", "sdpa"):
            if m in ms:
                cells.append(f"{ms[m]['fwdbwd']:6.2f} ({ms[m]['fwdbwd'] / fu['fwdbwd']:4.1f}x)")
            else:
                cells.append(f"{'-':>16}")
        print(f"{s['H']:>3} {s['N']:>4} {s['l']:>6} | {fu['fwd']:4.2f}/{fu['fwdbwd']:5.2f} | "
              f"{s['floor_ms']['fwd']:4.2f}/{s['floor_ms']['fwdbwd']:5.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
