"""How the fused RoPE-SSD kernels are launched: one frozen object, passed explicitly.

    rope_ssd(x, dt, A, B, C, ..., launch=dataclasses.replace(DEFAULT_LAUNCH, block_inner_dc=64))

Tile sizes, the storage precision of the per-chunk states and of the RoPE tables, and each kernel's warps, pipeline
stages and register cap. `DEFAULT_LAUNCH` is what the H200 measurements chose (docs/kernels.md has the numbers);
benchmarks and tests pass variants of it, nothing changes a module global. With TRANSXSSM_SSD_AUTOTUNE=1 Triton's
autotuner picks warps, stages and scan columns per shape instead (chunk.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KernelOptions:
    """Triton launch options of one kernel."""

    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int | None = None    # register cap per thread (None: the compiler's choice)

    def as_kwargs(self) -> dict:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options


@dataclass(frozen=True)
class LaunchConfig:
    # Row block of the tile kernels (chunk_output, dc, dxdb), and the blocks of their inner loops (each capped at the
    # row block): 64-wide inner blocks suit the forward and, with the states' gradients stored in bf16, dxdb; 32-wide
    # ones suit dc (168 registers: three programs per SM).
    block_rows: int = 64
    block_inner_fwd: int = 64
    block_inner_dc: int = 32
    block_inner_dxdb: int = 64
    # dc where B and C were rotated in place (rope_ssd's rotate_bc_in_place: no rotation in its loop, 168 registers
    # with 64-wide blocks, still three programs per SM): 0.139 -> 0.119 ms per 1.3B layer at b = 2 on the H200.
    block_inner_dc_in_place: int = 64
    # Rows the state scans take per step of their single loop over a sequence's row blocks.
    block_scan_fwd: int = 64
    block_scan_bwd: int = 64
    # Half-columns of the state per scan program; None: chosen per call (all N/2 up to 64 while b * H programs still
    # cover every SM, fewer for few batch rows).
    scan_columns: int | None = None
    # How the state recurrence over chunks runs: "walk" (the scans above: one program per batch row, head and column
    # block walks the sequence), "chunks" (every chunk's own sum in parallel, then an elementwise pass over the
    # chunks; _states.py), or None: chosen per call (chunk.py, _scan_mode: the walk from b*H >= SMs on).
    scan_mode: str | None = None
    # Elements of the (P x N) state per program of the chunk-parallel pass (512: 0.003 ms less than 1024 per 1.3B
    # layer at b = 2).
    pass_block: int = 512
    # Narrowest half-column tile: 32 keeps N = 64 unpadded (11-16% faster at the 1.3B-sized N = 64 layer,
    # docs/kernels.md); 64 pads it to N = 128's tiles. tests/gpu: test_narrow_half_tiles.
    half_tile_min: int = 32
    # Rotate bf16/fp16 operands with tables rounded to that dtype: half the table traffic. The rotated operands are
    # rounded to that dtype for the dot products anyway, so the error stays of the same order.
    tables_in_input_dtype: bool = True
    # Per-chunk states (forward) and their gradients (backward) stored in the input dtype (bf16 / fp16): the tile
    # kernels round them to it for their dots anyway, so only the backward scan's K_c = decay <dH, H_c> sees a
    # rounded state and storing the gradients rounded changes no result. Halves the state traffic.
    states_in_input_dtype: bool = True
    dstates_in_input_dtype: bool = True
    # Per kernel: the scans pipeline their single loop across chunks (3 stages, cp.async); the tile kernels run best
    # with one stage (2 stages measured 0.10-0.21 ms slower per kernel on the H200, docs/kernels.md).
    scan_fwd: KernelOptions = field(default_factory=lambda: KernelOptions(num_warps=4, num_stages=3))
    scan_bwd: KernelOptions = field(default_factory=lambda: KernelOptions(num_warps=4, num_stages=3))
    # The chunk sums pipeline their loop over a chunk's row blocks (3 stages: 9-14% faster than 2 on the H200)
    chunk_sums: KernelOptions = field(default_factory=lambda: KernelOptions(num_warps=4, num_stages=3))
    state_pass: KernelOptions = field(default_factory=lambda: KernelOptions(num_warps=4, num_stages=3))
    output: KernelOptions = field(default_factory=KernelOptions)
    # chunk_output_tma_kernel, where B and C are rotated in place (rope_ssd's rotate_bc_in_place): its source blocks
    # copied by TMA and multi-buffered in 3 stages
    output_tma: KernelOptions = field(default_factory=lambda: KernelOptions(num_warps=4, num_stages=3))
    dc: KernelOptions = field(default_factory=KernelOptions)
    dxdb: KernelOptions = field(default_factory=KernelOptions)

    def table_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype the kernels read the RoPE tables in for inputs of `input_dtype` (tables_in_input_dtype)."""
        return input_dtype if self.tables_in_input_dtype and input_dtype != torch.float32 else torch.float32


DEFAULT_LAUNCH = LaunchConfig()
