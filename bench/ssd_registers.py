"""Registers, spills and inner-loop instructions of the RoPE-SSD Triton kernels on sm_90 (H200), without a GPU.

    python bench/ssd_registers.py [--rows 64] [--inner-fwd 64] [--inner-dc 32] [--inner-dxdb 64] [--chunk 256]
                                  [--n 128] [--warps 4] [--scan-fwd 64] [--scan-bwd 64] [--scan-cols 64]
                                  [--scan-warps 4] [--scan-stages FWD BWD] [--half-tile-min 64] [--fp32 | --fp16]
                                  [--masked] [--seq] [--sass] [--json OUT]

Each kernel of transxssm_kernels.rope_ssd is compiled ahead of time for GPUTarget("cuda", 90, 32) (Triton frontend,
LLVM, PTX) with the specialisations of a real launch of the contiguous 1.3B layer (unit strides as constants, the other
integers and the pointers 16-divisible, H = G; block sizes and stages default to DEFAULT_LAUNCH's), and its PTX is
assembled by the ptxas bundled with Triton (`-v`): registers per thread, spill bytes and shared memory. With --sass
the cubin is disassembled (Triton's bundled nvdisasm) and the instructions of each loop (a backward branch) are
counted by opcode, so that a change to a kernel's inner loop can be weighed before it is timed on the GPU. The local
Triton may be newer than the GPU machine's (3.8 vs 3.6): numbers are indicative, the GPU benchmark decides.
"""

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH, _bwd, _fwd, _states

BF16_POINTERS = {"x_ptr", "b_ptr", "c_ptr", "g_ptr", "y_ptr", "dx_ptr", "db_ptr", "dc_ptr", "cos_ptr", "sin_ptr",
                 "v_ptr", "m_ptr", "states_ptr", "dstates_ptr"}
# last-dim strides: 1 in every launch
UNIT_STRIDES = {"s_xp", "s_bn", "s_cn", "s_gp", "s_yp", "s_dxp", "s_dn", "s_vp", "s_mn"}
TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_kernel(kernel, constexprs: dict, warps: int, stages: int, maxnreg=None, descriptors=None):
    """Compile as a launch would specialise it: bf16 tensors and tables (or fp32 / fp16), fp32 work buffers, int32
    document ids; unit strides and H/G = 1 as constants, other integers and every pointer 16-divisible; tensor
    descriptors (`descriptors`: name -> block shape) of the tensors' dtype."""
    sig, consts, attrs = {}, {}, {}
    dtype = {tl.float32: "fp32", tl.float16: "fp16"}.get(constexprs["DOT"], "bf16")
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name in (descriptors or {}):
            sig[name] = f"tensordesc<{dtype}[{','.join(map(str, descriptors[name]))}]>"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in BF16_POINTERS else ("*i32" if name == "seq_ptr" else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in UNIT_STRIDES or name == "HPG":
            sig[name], consts[(i,)] = "constexpr", 1
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages, maxnreg=maxnreg))


def loop_instructions(cubin: bytes) -> list:
    """Opcode counts of each loop body (from a backward branch's target to the branch) of the disassembled cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    labels, code, pending = {}, [], None
    for line in text.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if ins:
            addr = int(ins.group(1), 16)
            if pending:
                labels[pending], pending = addr, None
            code.append((addr, ins.group(2).split(".")[0], ins.group(3)))
    loops = []
    for addr, op, rest in code:
        target = re.search(r"\(\.(L_x_\d+)\)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), addr + 1) < addr:
            loops.append(collections.Counter(o for a, o, _ in code if labels[target.group(1)] <= a <= addr))
    return loops


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
    for flag, setting, what in (("--rows", "block_rows", "row block of the tile kernels"),
                                ("--inner-fwd", "block_inner_fwd", "inner block of the forward"),
                                ("--inner-dc", "block_inner_dc", "inner block of dc"),
                                ("--inner-dxdb", "block_inner_dxdb", "inner block of dxdb"),
                                ("--scan-fwd", "block_scan_fwd", "row block of the forward scan"),
                                ("--scan-bwd", "block_scan_bwd", "row block of the backward scan")):
        ap.add_argument(flag, type=int, default=getattr(DEFAULT_LAUNCH, setting),
                        help=f"{what} (LaunchConfig.{setting})")
    ap.add_argument("--scan-warps", type=int, default=4, help="warps of the state scans")
    ap.add_argument("--scan-stages", type=int, nargs=2, default=None, metavar=("FWD", "BWD"),
                    help="pipeline stages of the forward and backward scans (default: DEFAULT_LAUNCH's)")
    ap.add_argument("--scan-cols", type=int, default=64, help="half-columns per state-scan program (BNH)")
    ap.add_argument("--half-tile-min", type=int, default=64, help="LaunchConfig.half_tile_min (32: N = 64 unpadded)")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread of the tile kernels")
    ap.add_argument("--fp32", action="store_true", help="fp32 inputs (tf32 dots, operands rounded by to_dot)")
    ap.add_argument("--fp16", action="store_true", help="fp16 inputs (rotation in fp32)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--n", type=int, default=128, help="state size N")
    ap.add_argument("--p", type=int, default=64, help="head dim P")
    ap.add_argument("--warps", type=int, default=4, help="warps of the tile kernels")
    ap.add_argument("--seq", action="store_true", help="with document boundaries (seq_idx)")
    ap.add_argument("--masked", action="store_true", help="tile kernels with masks (l not a multiple of the chunk)")
    ap.add_argument("--sass", action="store_true", help="also count each loop's SASS instructions by opcode")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()

    common = dict(N_HALF=args.n // 2, Q=args.chunk, BLOCK_P=max(16, triton.next_power_of_2(args.p)),
                  BLOCK_NH=max(args.half_tile_min, triton.next_power_of_2(args.n // 2)),
                  DOT=tl.float32 if args.fp32 else (tl.float16 if args.fp16 else tl.bfloat16),
                  HAS_ROPE=True, HAS_SEQ=args.seq)
    bt = min(args.rows, args.chunk)
    inner = lambda n: min(n, bt)
    scan = dict(common, BNH=args.scan_cols)
    even = not args.masked
    stages_fwd, stages_bwd = args.scan_stages or (DEFAULT_LAUNCH.scan_fwd.num_stages,
                                                  DEFAULT_LAUNCH.scan_bwd.num_stages)
    cases = {   # launch options as rope_ssd passes them
        "state_scan_fwd": (_fwd.state_scan_fwd_kernel, dict(scan, BS=min(args.scan_fwd, args.chunk), HAS_INIT=False),
                           args.scan_warps, stages_fwd),
        "chunk_output": (_fwd.chunk_output_kernel, dict(common, BT=bt, BI=inner(args.inner_fwd), EVEN=even),
                         args.warps, 1),
        "state_scan_bwd": (_bwd.state_scan_bwd_kernel, dict(scan, BS=min(args.scan_bwd, args.chunk),
                                                            HAS_DFINAL=False), args.scan_warps, stages_bwd),
        "dc": (_bwd.dc_kernel, dict(common, BT=bt, BI=inner(args.inner_dc), TF32=args.fp32, EVEN=even,
                                    UNROTATE=True), args.warps, 1),
        "dxdb": (_bwd.dxdb_kernel, dict(common, BT=bt, BI=inner(args.inner_dxdb), TF32=args.fp32, EVEN=even,
                                        UNROTATE=True), args.warps, 1),
        # the chunk-parallel state recurrence (LaunchConfig.scan_mode "chunks")
        "chunk_sums_fwd": (_states.chunk_sums_kernel, dict(common, BNH=args.scan_cols, MODE=0,
                                                          BS=min(args.scan_fwd, args.chunk), STORE_ROTATED=False),
                           DEFAULT_LAUNCH.chunk_sums.num_warps, DEFAULT_LAUNCH.chunk_sums.num_stages),
        "chunk_sums_bwd": (_states.chunk_sums_kernel, dict(common, BNH=args.scan_cols, MODE=1,
                                                          BS=min(args.scan_bwd, args.chunk), STORE_ROTATED=False),
                           DEFAULT_LAUNCH.chunk_sums.num_warps, DEFAULT_LAUNCH.chunk_sums.num_stages),
        "states_pass": (_states.states_from_sums_kernel, dict(Q=args.chunk, BLOCK=DEFAULT_LAUNCH.pass_block,
                                                              HAS_SEQ=args.seq, HAS_INIT=False, DOT=common["DOT"]),
                        DEFAULT_LAUNCH.state_pass.num_warps, DEFAULT_LAUNCH.state_pass.num_stages),
        "dstates_pass": (_states.dstates_from_sums_kernel, dict(Q=args.chunk, BLOCK=DEFAULT_LAUNCH.pass_block,
                                                                HAS_SEQ=args.seq, HAS_DFINAL=False,
                                                                DOT=common["DOT"]),
                         DEFAULT_LAUNCH.state_pass.num_warps, DEFAULT_LAUNCH.state_pass.num_stages),
    }
    descriptors = {}
    if even and not args.fp32:   # B and C rotated in place (rope_ssd's rotate_bc_in_place)
        tma = {k: v for k, v in common.items() if k not in ("BLOCK_NH", "HAS_ROPE")}
        cases.update({
            "chunk_sums_fwd_in_place": (_states.chunk_sums_kernel, dict(cases["chunk_sums_fwd"][1], STORE_ROTATED=True),
                                        DEFAULT_LAUNCH.chunk_sums.num_warps, DEFAULT_LAUNCH.chunk_sums.num_stages),
            "chunk_output_tma": (_fwd.chunk_output_tma_kernel, dict(tma, BT=bt), DEFAULT_LAUNCH.output_tma.num_warps,
                                 DEFAULT_LAUNCH.output_tma.num_stages),
            "dc_rotated": (_bwd.dc_kernel, dict(cases["dc"][1], HAS_ROPE=False), args.warps, 1),
            "dxdb_rotated": (_bwd.dxdb_kernel, dict(cases["dxdb"][1], HAS_ROPE=False), args.warps, 1),
        })
        descriptors["chunk_output_tma"] = {"x_desc": [bt, common["BLOCK_P"]], "b_desc": [bt, args.n // 2]}
    table = {}
    for name, (k, c, w, stages) in cases.items():
        compiled = compile_kernel(k, c, w, stages, None if "scan" in name else args.maxnreg, descriptors.get(name))
        table[name] = dict(ptxas_report(compiled.asm["ptx"]), shared_bytes=compiled.metadata.shared)
        if args.sass:
            table[name]["loops"] = [dict(loop.most_common()) for loop in loop_instructions(compiled.asm["cubin"])]
    print(f"sm_90, triton {triton.__version__}, {vars(args)}")
    print(f"{'kernel':16s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'shared':>7s}")
    for name, r in table.items():
        print(f"{name:16s} {r['registers']:5d} {r['spill_store_bytes']:9d} {r['spill_load_bytes']:9d} "
              f"{r['shared_bytes']:7d}")
        for loop in r.get("loops", []):
            if sum(loop.values()) >= 50:   # the small loops are the prologue's
                top = ", ".join(f"{op} {n}" for op, n in list(loop.items())[:10])
                print(f"{'':16s} loop of {sum(loop.values())} instructions: {top}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "args": vars(args), "kernels": table},
                                              indent=1))


if __name__ == "__main__":
    main()
