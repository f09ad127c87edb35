"""Mamba-2's output gate, RMSNorm((y + D x) * silu(z)) per group of channels times a weight, forward and backward
as Triton kernels.

Why not torch.compile: Inductor's forward is one kernel at the memory bandwidth, but it split the backward into four
(the input gradients, then one reduction over the rows per weight, D's gradient among them), reading y, x and z
again for each: ~155 us per 320m layer and micro-batch of 16K tokens in the Mamba-2 step's profile
(bench/results/train-speed-2026-12-04.json), where reading the inputs and the incoming gradient once and writing
three gradients takes ~50 us. Here a program takes a block of rows and one group of channels: forward it reads
y, x, z once and writes the result; backward it recomputes the group's norm from the same reads, writes d y, d x,
d z once, and keeps per-channel sums of the weight's and D's gradient over its rows, which are then summed over
programs in a fixed order (no atomics). fp32 math, the inputs' dtype out, as the eager reference
(`transxssm_megatron.model.fused_ops.gate_norm.reference`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS, ROW_BLOCKS_PER_PROGRAM = 16, 8   # backward: 128 rows a program, to keep few partial sums


@triton.jit
def _gate(pid_r, g, y_ptr, x_ptr, z_ptr, d_ptr, rows, batch, head_dim, group_size, ys, xs, zs,
          HAS_D: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    """Rows and channels of a (row block, group) tile, and u = y + D x, s = silu(z) there in fp32. Strides ys, xs,
    zs: (position, batch row, head) of (l, b, H, P) tensors whose last dim is contiguous."""
    r = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
    t, bi = r // batch, r % batch
    j = tl.arange(0, BG)
    c = g * group_size + j
    h, p = c // head_dim, c % head_dim
    m = (r < rows) & (j < group_size)[None, :]
    y = tl.load(y_ptr + t * ys[0] + bi * ys[1] + (h * ys[2] + p)[None, :], mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + t * zs[0] + bi * zs[1] + (h * zs[2] + p)[None, :], mask=m, other=0.0).to(tl.float32)
    x = tl.zeros_like(y)
    u = y
    if HAS_D:
        x = tl.load(x_ptr + t * xs[0] + bi * xs[1] + (h * xs[2] + p)[None, :], mask=m, other=0.0).to(tl.float32)
        u = y + tl.load(d_ptr + h, mask=j < group_size, other=0.0).to(tl.float32)[None, :] * x
    sig = tl.sigmoid(z)
    return r, c, m, x, z, u, sig


@triton.jit
def gate_norm_fwd_kernel(y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, out_ptr, rows, batch, head_dim, group_size, width, eps,
                         ys_l, ys_b, ys_h, xs_l, xs_b, xs_h, zs_l, zs_b, zs_h,
                         HAS_D: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    pid_r, g = tl.program_id(0), tl.program_id(1)
    r, c, m, x, z, u, sig = _gate(pid_r, g, y_ptr, x_ptr, z_ptr, d_ptr, rows, batch, head_dim, group_size,
                                  (ys_l, ys_b, ys_h), (xs_l, xs_b, xs_h), (zs_l, zs_b, zs_h), HAS_D, BR, BG)
    o = u * z * sig
    rstd = tl.rsqrt(tl.sum(o * o, axis=1) / group_size + eps)[:, None]
    w = tl.load(w_ptr + c, mask=c < (g + 1) * group_size, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r * width + c[None, :], (o * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_norm_bwd_kernel(y_ptr, x_ptr, z_ptr, d_ptr, w_ptr, dres_ptr, dy_ptr, dx_ptr, dz_ptr, dw_part_ptr,
                         dd_part_ptr, rows, batch, head_dim, group_size, width, eps,
                         ys_l, ys_b, ys_h, xs_l, xs_b, xs_h, zs_l, zs_b, zs_h, blocks: tl.constexpr,
                         HAS_D: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    pid_r, g = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BG)
    c_own = g * group_size + j
    w = tl.load(w_ptr + c_own, mask=j < group_size, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BG,), tl.float32)
    dd = tl.zeros((BG,), tl.float32)
    for i in range(blocks):
        r, c, m, x, z, u, sig = _gate(pid_r * blocks + i, g, y_ptr, x_ptr, z_ptr, d_ptr, rows, batch, head_dim,
                                      group_size, (ys_l, ys_b, ys_h), (xs_l, xs_b, xs_h), (zs_l, zs_b, zs_h),
                                      HAS_D, BR, BG)
        s = z * sig
        o = u * s
        rstd = tl.rsqrt(tl.sum(o * o, axis=1) / group_size + eps)[:, None]
        n = o * rstd
        dres = tl.load(dres_ptr + r * width + c[None, :], mask=m, other=0.0).to(tl.float32)
        dn = dres * w
        do = rstd * (dn - n * (tl.sum(dn * n, axis=1) / group_size)[:, None])
        du = do * s
        dz = do * u * sig * (1.0 + z * (1.0 - sig))            # d silu / d z = sig (1 + z (1 - sig))
        tl.store(dy_ptr + r * width + c[None, :], du.to(dy_ptr.dtype.element_ty), mask=m)
        tl.store(dz_ptr + r * width + c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
        dw += tl.sum(dres * n, axis=0)
        if HAS_D:
            d = tl.load(d_ptr + c // head_dim, mask=j < group_size, other=0.0).to(tl.float32)[None, :]
            tl.store(dx_ptr + r * width + c[None, :], (du * d).to(dx_ptr.dtype.element_ty), mask=m)
            dd += tl.sum(du * x, axis=0)
    tl.store(dw_part_ptr + pid_r * width + c_own, dw, mask=j < group_size)
    if HAS_D:
        tl.store(dd_part_ptr + pid_r * width + c_own, dd, mask=j < group_size)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _checked(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _GateNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, D, z, weight, eps, group_size):
        l, b, heads, head_dim = y.shape
        y, x, z = _checked(y), _checked(x), _checked(z)
        width, rows = heads * head_dim, l * b
        out = torch.empty((l, b, width), device=y.device, dtype=y.dtype)
        block_g = triton.next_power_of_2(group_size)
        grid = (triton.cdiv(rows, BLOCK_ROWS), width // group_size)
        gate_norm_fwd_kernel[grid](y, x, z, D if D is not None else y, weight, out, rows, b, head_dim, group_size,
                                   width, eps, *_strides(y), *_strides(x), *_strides(z), HAS_D=D is not None,
                                   BR=BLOCK_ROWS, BG=block_g)
        ctx.save_for_backward(y, x, D, z, weight)
        ctx.eps, ctx.group_size = eps, group_size
        return out

    @staticmethod
    def backward(ctx, dres):
        y, x, D, z, weight = ctx.saved_tensors
        l, b, heads, head_dim = y.shape
        width, rows, group_size = heads * head_dim, l * b, ctx.group_size
        dres = dres.contiguous()
        dy, dz = torch.empty_like(dres), torch.empty_like(dres)
        dx = torch.empty_like(dres) if D is not None else None
        programs = triton.cdiv(rows, BLOCK_ROWS * ROW_BLOCKS_PER_PROGRAM)
        dw_part = torch.empty((programs, width), device=y.device, dtype=torch.float32)
        dd_part = torch.empty((programs, width), device=y.device, dtype=torch.float32) if D is not None else dw_part
        grid = (programs, width // group_size)
        gate_norm_bwd_kernel[grid](y, x, z, D if D is not None else y, weight, dres, dy, dx if dx is not None else dy,
                                   dz, dw_part, dd_part, rows, b, head_dim, group_size, width, ctx.eps,
                                   *_strides(y), *_strides(x), *_strides(z), blocks=ROW_BLOCKS_PER_PROGRAM,
                                   HAS_D=D is not None, BR=BLOCK_ROWS, BG=triton.next_power_of_2(group_size))
        shape = y.shape
        dD = dd_part.sum(0).view(heads, head_dim).sum(1).to(D.dtype) if D is not None else None
        return (dy.view(shape), dx.view(shape) if dx is not None else None, dD, dz.view(shape),
                dw_part.sum(0).to(weight.dtype), None, None)


def gate_norm(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
              eps: float, group_size: int) -> torch.Tensor:
    """RMSNorm((y + D x) * silu(z)) over groups of `group_size` channels, times weight. y, x, z (l, b, H, P), any
    strides with a contiguous last dim; D (H,) or None; weight (H * P,). Returns (l, b, H * P) in y's dtype.
    Differentiable; CUDA (or the Triton interpreter)."""
    heads, head_dim = y.shape[2:]
    if (heads * head_dim) % group_size:
        raise ValueError(f"gate_norm: groups of {group_size} channels do not divide the {heads * head_dim} channels")
    return _GateNorm.apply(y, x, D, z, weight, eps, group_size)
