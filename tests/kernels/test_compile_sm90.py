"""Every RoPE-SSD Triton kernel compiles for the H200 (sm_90) in each dtype and layout, here without a GPU.

The interpreter tests never reach the code that only exists on the GPU (the inline PTX of the packed bf16 rotation,
exp_ftz, pin, the L1 prefetch): bench/ssd_registers.py compiles every kernel ahead of time through Triton, LLVM and
the bundled ptxas, in a fresh process without TRITON_INTERPRET. A GPU-only compile failure (an fp32 register operand
packed two to a register, say) fails here instead of on the GPU machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


CASES = {"bf16": [], "fp32": ["--fp32"], "fp16-masked-documents": ["--fp16", "--masked", "--seq"],
         "bf16-N64": ["--n", "64", "--half-tile-min", "32"]}


@pytest.mark.parametrize("flags", CASES.values(), ids=CASES.keys())
def test_kernels_compile_for_sm90(flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ssd_registers.py"), *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    in_place = ["chunk_sums_fwd_in_place", "chunk_output_tma", "dc_rotated", "dxdb_rotated"]   # 16-bit whole chunks
    assert [r[0] for r in rows] == ["state_scan_fwd", "chunk_output", "state_scan_bwd", "dc", "dxdb", "chunk_sums_fwd",
                                    "chunk_sums_bwd", "states_pass", "dstates_pass",
                                    *(in_place if "--fp32" not in flags and "--masked" not in flags else [])], out.stdout
    assert all(0 < int(r[1]) <= 255 for r in rows), out.stdout   # registers per thread
