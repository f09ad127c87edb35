"""Registers and spills of the RoPE-SSD Triton kernels on sm_90 (H200), computed here without a GPU.

    python bench/ssd_registers.py [--rows 64] [--inner-fwd 64] [--inner-dc 32] [--inner-dxdb 32] [--chunk 256]
                                  [--n 128] [--warps 4] [--scan-fwd 64] [--scan-bwd 32] [--scan-cols 64]
                                  [--scan-warps 4] [--half-tile-min 64] [--fp32] [--json OUT]

Each kernel of kernels/rope_ssd is compiled ahead of time for GPUTarget("cuda", 90, 32) (Triton frontend, LLVM,
PTX) and its PTX is assembled by the ptxas bundled with Triton (`-v`), which reports registers per thread and
spill bytes. On the H200 the tile kernels were bound by spills (bench/NOTES-ssd.md, ncu), so this is the quick,
GPU-free check of a tile-layout change. The local Triton may be newer than the GPU machine's (3.8 vs 3.6):
numbers are indicative, the GPU benchmark decides.
"""

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from transxssm_kernels.rope_ssd import _bwd, _fwd

BF16_POINTERS = {"x_ptr", "b_ptr", "c_ptr", "g_ptr", "y_ptr", "dx_ptr", "db_ptr", "dc_ptr"}
TARGET = GPUTarget("cuda", 90, 32)


def signature(kernel, constexprs: dict) -> dict:
    """bf16 tensors as in the model's path (fp32 with --fp32), fp32 work buffers, int32 document ids and scalars."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            data = "*fp32" if constexprs["DOT"] == tl.float32 else "*bf16"
            sig[name] = data if name in BF16_POINTERS else ("*i32" if name == "seq_ptr" else "*fp32")
        else:
            sig[name] = "i32"
    return sig


def ptx_of(kernel, constexprs: dict, warps: int, stages: int, maxnreg=None) -> str:
    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    options = dict(num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    return triton.compile(src, target=TARGET, options=options).asm["ptx"]


def ptxas_report(ptx: str) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True, check=True).stderr
    num = lambda pattern: int(re.search(pattern, out).group(1)) if re.search(pattern, out) else 0
    return {"registers": num(r"Used (\d+) registers"), "spill_store_bytes": num(r"(\d+) bytes spill stores"),
            "spill_load_bytes": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="row block of the tile kernels (chunk.BLOCK_ROWS)")
    ap.add_argument("--inner-fwd", type=int, default=64, help="inner block of the forward (chunk.BLOCK_INNER_FWD)")
    ap.add_argument("--inner-dc", type=int, default=32, help="inner block of dc (chunk.BLOCK_INNER_DC)")
    ap.add_argument("--inner-dxdb", type=int, default=32, help="inner block of dxdb (chunk.BLOCK_INNER_DXDB)")
    ap.add_argument("--scan-fwd", type=int, default=64, help="row block of the forward scan (chunk.BLOCK_SCAN_FWD)")
    ap.add_argument("--scan-bwd", type=int, default=32, help="row block of the backward scan (chunk.BLOCK_SCAN_BWD)")
    ap.add_argument("--scan-warps", type=int, default=4, help="warps of the state scans")
    ap.add_argument("--scan-cols", type=int, default=64, help="half-columns per state-scan program (BNH)")
    ap.add_argument("--half-tile-min", type=int, default=64, help="chunk.HALF_TILE_MIN (32: N = 64 unpadded)")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread of the tile kernels")
    ap.add_argument("--fp32", action="store_true", help="fp32 inputs (tf32 dots, operands rounded by to_dot)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--n", type=int, default=128, help="state size N")
    ap.add_argument("--p", type=int, default=64, help="head dim P")
    ap.add_argument("--warps", type=int, default=4, help="warps of the tile kernels")
    ap.add_argument("--seq", action="store_true", help="with document boundaries (seq_idx)")
    ap.add_argument("--masked", action="store_true", help="tile kernels with masks (l not a multiple of the chunk)")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()

    common = dict(N_HALF=args.n // 2, Q=args.chunk, BLOCK_P=max(16, triton.next_power_of_2(args.p)),
                  BLOCK_NH=max(args.half_tile_min, triton.next_power_of_2(args.n // 2)),
                  DOT=tl.float32 if args.fp32 else tl.bfloat16, HAS_ROPE=True, HAS_SEQ=args.seq)
    bt = min(args.rows, args.chunk)
    inner = lambda n: min(n, bt)
    scan = dict(common, BNH=args.scan_cols)
    even = not args.masked
    cases = {   # launch options as chunk.py sets them
        "state_scan_fwd": (_fwd.state_scan_fwd_kernel, dict(scan, BS=min(args.scan_fwd, args.chunk), HAS_INIT=False),
                           args.scan_warps, 2),
        "chunk_output": (_fwd.chunk_output_kernel, dict(common, BT=bt, BI=inner(args.inner_fwd), EVEN=even),
                         args.warps, 1),
        "state_scan_bwd": (_bwd.state_scan_bwd_kernel, dict(scan, BS=min(args.scan_bwd, args.chunk),
                                                            HAS_DFINAL=False), args.scan_warps, 1),
        "dc": (_bwd.dc_kernel, dict(common, BT=bt, BI=inner(args.inner_dc), TF32=args.fp32, EVEN=even), args.warps,
               1),
        "dxdb": (_bwd.dxdb_kernel, dict(common, BT=bt, BI=inner(args.inner_dxdb), TF32=args.fp32, EVEN=even),
                 args.warps, 1),
    }
    table = {name: ptxas_report(ptx_of(k, c, w, s, None if "scan" in name else args.maxnreg))
             for name, (k, c, w, s) in cases.items()}
    print(f"sm_90, triton {triton.__version__}, {vars(args)}")
    print(f"{'kernel':16s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s}")
    for name, r in table.items():
        print(f"{name:16s} {r['registers']:5d} {r['spill_store_bytes']:9d} {r['spill_load_bytes']:9d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "args": vars(args), "kernels": table},
                                              indent=1))


if __name__ == "__main__":
    main()
