"""Registers and spills of Triton kernels compiled for the H200 (sm_90) ahead of time, without a GPU: the GPU-only
compile path (LLVM, PTX, ptxas) that the interpreter tests never reach.

    reports = sm90_reports("transxssm_kernels.causal_conv", [["conv_fwd_kernel", {"BT": 32, "BC": 128}, 4]],
                           fp32_pointers=["dw_part_ptr"])

runs this file in a process without TRITON_INTERPRET and returns one dict per kernel (bench/ssd_registers.py's
ptxas report: registers, spill_store_bytes, ...). Pointers are bf16 tensors but those named in fp32_pointers,
`eps` an fp32 scalar, other integers and every pointer 16-divisible, as a launch specialises them."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sm90_reports(module: str, kernels: list, fp32_pointers: list = ()) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__)), module, json.dumps(kernels), *fp32_pointers],
                         cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()[-len(kernels):]]


def report(kernel, constexprs: dict, warps: int, fp32_pointers: set) -> dict:
    import triton
    from triton.compiler import ASTSource

    sys.path.insert(0, str(HERE.parents[1] / "bench"))
    from ssd_registers import TARGET, ptxas_report

    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = ("*fp32" if name in fp32_pointers else "*bf16") if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return ptxas_report(triton.compile(src, target=TARGET, options=dict(num_warps=warps)).asm["ptx"])


if __name__ == "__main__":
    import importlib

    module = importlib.import_module(sys.argv[1])
    for name, constexprs, warps in json.loads(sys.argv[2]):
        print(json.dumps(report(getattr(module, name), constexprs, warps, set(sys.argv[3:]))))
