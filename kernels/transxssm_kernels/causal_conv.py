"""The Mamba-2 mixer's input split with its causal depthwise conv1d + SiLU, forward and backward as Triton kernels.

In: the in_proj output proj (l, b, G * (z + c)), laid out per group as [z | x B C] (c = x + 2N channels), a conv
weight (G * c, 1, 4) and bias (G * c,). Out: z, a view of proj, and x, B, C, views of silu(conv(xBC) + bias),
one (l, b, G, c) tensor. The conv runs along l, causally (zeros before the start), each channel on its own; the
gradients of x, B and C may come as separate tensors of any strides.

The model's conv on CUDA with fusion on (TRANSXSSM_CONV_KERNELS=0 chooses Inductor's compiled conv instead): on an
H200 the split with the conv takes 0.83 ms forward + backward per 320m layer and micro-batch of 16K tokens against
Inductor's 1.15, and Mamba-2 320m trains 9% faster (docs/performance.md). An earlier backward, whose per-tile sums
across warps put 20 barriers in its loop, took ~2 ms and made the step 17% slower than Inductor's.

The aim: Inductor writes the conv as shifted multiply-adds into a padded fp32 copy of x|B|C, and its
backward as four kernels plus a reduction for the weight gradient; on an H200 that takes ~1.1 ms per 320m layer
and micro-batch of 16K tokens, several times what reading and writing the activations once needs. Here the forward
reads x|B|C once where proj holds it and writes the output once. The backward is one pass too: a program takes a
tile of positions and channels, loads x at the 7 positions t-3..t+3 and the incoming gradient at t..t+3 (the
overlapping tiles come from cache), recomputes the conv at t..t+3 for SiLU's derivative, and writes
d xBC(t) = sum_k w[k] g(t + 3 - k) into a gradient laid out like proj, next to z's gradient; the weight and bias
gradients are summed per program in fp32, per element over its tiles and across positions once at the end, and
then over programs (no atomics: the sums do not depend on timing).
Width 4 only (Mamba-2's; the caller keeps the compiled path for others). fp32 math, proj's dtype out, as the
eager reference (`transxssm_megatron.model.fused_ops.split_projection.reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

WIDTH = 4
BLOCK_T, BLOCK_C = 32, 128   # the forward's tile (positions x channels)


class BackwardLaunch(NamedTuple):
    """The backward's tile (positions x channels), warps per program and tiles a program walks."""
    positions: int
    channels: int
    warps: int
    tiles: int


# The backward keeps four x tiles, the gradient and per-channel sums live: 16 x 64 over 8 warps compiles for sm_90
# to 128 registers a thread (Triton 3.6 and 3.8; over 4 warps 253-255, 16 x 128 spills). The fastest of ten launch
# shapes on an H200 (bench/causal_conv.py): 0.83 ms forward + backward at Mamba-2 320m's split of 16K tokens, 1.89
# with one tile per program, 1.04 over 4 warps.
DEFAULT_BACKWARD = BackwardLaunch(positions=16, channels=64, warps=8, tiles=16)


@triton.jit
def _channels(pid_c, channels, conv_width, z_width, group_width, BC: tl.constexpr):
    """A block of conv channels: their index, their column in proj and the mask."""
    c = pid_c * BC + tl.arange(0, BC)
    column = (c // conv_width) * group_width + z_width + c % conv_width
    return c, column, c < channels


@triton.jit
def _load_x(proj_ptr, t, b, column, mask_c, length, stride_l, stride_b):
    """x|B|C at positions t (a column of positions) as fp32, zero before the start and past the end."""
    m = (t >= 0) & (t < length) & mask_c[None, :]
    return tl.load(proj_ptr + t * stride_l + b * stride_b + column[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _weights(w_ptr, c, mask_c):
    """The four taps of each channel's conv weight (C, 1, 4) as fp32 rows."""
    w = w_ptr + c * 4
    return (tl.load(w, mask=mask_c, other=0.0).to(tl.float32)[None, :],
            tl.load(w + 1, mask=mask_c, other=0.0).to(tl.float32)[None, :],
            tl.load(w + 2, mask=mask_c, other=0.0).to(tl.float32)[None, :],
            tl.load(w + 3, mask=mask_c, other=0.0).to(tl.float32)[None, :])


@triton.jit
def conv_fwd_kernel(proj_ptr, w_ptr, bias_ptr, out_ptr, length, channels, conv_width, z_width, group_width,
                    stride_l, stride_b, out_stride_l, out_stride_b, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, column, mask_c = _channels(pid_c, channels, conv_width, z_width, group_width, BC)
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)[:, None]
    w0, w1, w2, w3 = _weights(w_ptr, c, mask_c)
    acc = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    acc += w0 * _load_x(proj_ptr, t - 3, b, column, mask_c, length, stride_l, stride_b)
    acc += w1 * _load_x(proj_ptr, t - 2, b, column, mask_c, length, stride_l, stride_b)
    acc += w2 * _load_x(proj_ptr, t - 1, b, column, mask_c, length, stride_l, stride_b)
    acc += w3 * _load_x(proj_ptr, t, b, column, mask_c, length, stride_l, stride_b)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + t * out_stride_l + b * out_stride_b + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(t < length) & mask_c[None, :])


@triton.jit
def _load_grad(dx_ptr, db_ptr, dc_ptr, t, b, c, mask_c, length, conv_width, x_width, n, sx, sb, sc):
    """The incoming gradient of silu(conv) at positions t as fp32, from the three tensors of x, B and C (strides
    sx, sb, sc: position, batch, group); zero past the end."""
    g, j = c // conv_width, c % conv_width
    m = (t < length) & mask_c[None, :]
    in_x, in_c = j < x_width, j >= x_width + n
    in_b = (j >= x_width) & ~in_c
    out = tl.load(dx_ptr + t * sx[0] + b * sx[1] + (g * sx[2] + j)[None, :], mask=m & in_x[None, :], other=0.0)
    out = out.to(tl.float32)
    out += tl.load(db_ptr + t * sb[0] + b * sb[1] + (g * sb[2] + j - x_width)[None, :], mask=m & in_b[None, :],
                   other=0.0).to(tl.float32)
    out += tl.load(dc_ptr + t * sc[0] + b * sc[1] + (g * sc[2] + j - x_width - n)[None, :],
                   mask=m & in_c[None, :], other=0.0).to(tl.float32)
    return out


@triton.jit
def _silu_grad(pre, dout):
    """dout * d silu(pre) / d pre."""
    sig = tl.sigmoid(pre)
    return dout * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def conv_bwd_kernel(proj_ptr, w_ptr, bias_ptr, dx_ptr, db_ptr, dc_ptr, dproj_ptr, dw_part_ptr, db_part_ptr,
                    length, channels, conv_width, z_width, group_width, x_width, n, stride_l, stride_b,
                    sx_l, sx_b, sx_g, sb_l, sb_b, sb_g, sc_l, sc_b, sc_g, dproj_stride_l, dproj_stride_b,
                    tiles: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, column, mask_c = _channels(pid_c, channels, conv_width, z_width, group_width, BC)
    w0, w1, w2, w3 = _weights(w_ptr, c, mask_c)
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # per-element partial sums of the weight and bias gradients, reduced over positions once, after the loop
    dw0 = tl.zeros((BT, BC), tl.float32)
    dw1 = tl.zeros((BT, BC), tl.float32)
    dw2 = tl.zeros((BT, BC), tl.float32)
    dw3 = tl.zeros((BT, BC), tl.float32)
    db = tl.zeros((BT, BC), tl.float32)
    strides = (sx_l, sx_b, sx_g), (sb_l, sb_b, sb_g), (sc_l, sc_b, sc_g)
    for i in range(tiles):
        t = ((pid_t * tiles + i) * BT + tl.arange(0, BT)).to(tl.int64)[:, None]
        # g(s) = dout(s) * silu'(conv(s)) at s = t, t+1, t+2, t+3, each from the four x before it, loaded in
        # order so that four x tiles are live at a time; dout is zero past the end, so is g
        xa = _load_x(proj_ptr, t - 3, b, column, mask_c, length, stride_l, stride_b)
        xb = _load_x(proj_ptr, t - 2, b, column, mask_c, length, stride_l, stride_b)
        xc = _load_x(proj_ptr, t - 1, b, column, mask_c, length, stride_l, stride_b)
        xd = _load_x(proj_ptr, t, b, column, mask_c, length, stride_l, stride_b)
        g = _silu_grad(bias + w0 * xa + w1 * xb + w2 * xc + w3 * xd,
                       _load_grad(dx_ptr, db_ptr, dc_ptr, t, b, c, mask_c, length, conv_width, x_width, n, *strides))
        # weight k multiplies x(t - 3 + k) in the output at t
        dw0 += g * xa
        dw1 += g * xb
        dw2 += g * xc
        dw3 += g * xd
        db += g
        dx = w3 * g
        xa = _load_x(proj_ptr, t + 1, b, column, mask_c, length, stride_l, stride_b)
        dx += w2 * _silu_grad(bias + w0 * xb + w1 * xc + w2 * xd + w3 * xa,
                              _load_grad(dx_ptr, db_ptr, dc_ptr, t + 1, b, c, mask_c, length, conv_width, x_width,
                                         n, *strides))
        xb = _load_x(proj_ptr, t + 2, b, column, mask_c, length, stride_l, stride_b)
        dx += w1 * _silu_grad(bias + w0 * xc + w1 * xd + w2 * xa + w3 * xb,
                              _load_grad(dx_ptr, db_ptr, dc_ptr, t + 2, b, c, mask_c, length, conv_width, x_width,
                                         n, *strides))
        xc = _load_x(proj_ptr, t + 3, b, column, mask_c, length, stride_l, stride_b)
        dx += w0 * _silu_grad(bias + w0 * xd + w1 * xa + w2 * xb + w3 * xc,
                              _load_grad(dx_ptr, db_ptr, dc_ptr, t + 3, b, c, mask_c, length, conv_width, x_width,
                                         n, *strides))
        tl.store(dproj_ptr + t * dproj_stride_l + b * dproj_stride_b + column[None, :],
                 dx.to(dproj_ptr.dtype.element_ty), mask=(t < length) & mask_c[None, :])
    part = (pid_t * tl.num_programs(1) + b) * channels
    tl.store(dw_part_ptr + (part + c) * 4 + 0, tl.sum(dw0, axis=0), mask=mask_c)
    tl.store(dw_part_ptr + (part + c) * 4 + 1, tl.sum(dw1, axis=0), mask=mask_c)
    tl.store(dw_part_ptr + (part + c) * 4 + 2, tl.sum(dw2, axis=0), mask=mask_c)
    tl.store(dw_part_ptr + (part + c) * 4 + 3, tl.sum(dw3, axis=0), mask=mask_c)
    tl.store(db_part_ptr + part + c, tl.sum(db, axis=0), mask=mask_c)


class _ConvSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, groups, widths, weight, bias, launch):
        l, b = proj.shape[:2]
        z_width, x_width, n, _ = widths
        group_width, conv_width = proj.shape[-1] // groups, x_width + 2 * n
        channels = groups * conv_width
        out = torch.empty((l, b, groups, conv_width), device=proj.device, dtype=proj.dtype)
        grid = (triton.cdiv(l, BLOCK_T), b, triton.cdiv(channels, BLOCK_C))
        conv_fwd_kernel[grid](proj, weight, bias, out, l, channels, conv_width, z_width, group_width,
                              proj.stride(0), proj.stride(1), out.stride(0), out.stride(1), BT=BLOCK_T, BC=BLOCK_C)
        ctx.save_for_backward(proj, weight, bias)
        ctx.groups, ctx.widths, ctx.launch = groups, widths, launch
        z = proj.view(l, b, groups, group_width)[..., :z_width] if z_width else None
        return (z, *out.split([x_width, n, n], dim=-1))

    @staticmethod
    def backward(ctx, dz, dx, dB, dC):
        proj, weight, bias = ctx.saved_tensors
        groups, (z_width, x_width, n, _), launch = ctx.groups, ctx.widths, ctx.launch
        l, b = proj.shape[:2]
        group_width, conv_width = proj.shape[-1] // groups, x_width + 2 * n
        channels = groups * conv_width
        dproj = torch.empty((l, b, groups, group_width), device=proj.device, dtype=proj.dtype)
        if z_width:
            dproj[..., :z_width].copy_(dz) if dz is not None else dproj[..., :z_width].zero_()
        # a piece no loss depends on has no gradient: zeros; a piece's last dim must be contiguous
        pieces = [torch.zeros((l, b, groups, w), device=proj.device, dtype=proj.dtype) if g is None else
                  g if g.stride(-1) == 1 else g.contiguous() for g, w in ((dx, x_width), (dB, n), (dC, n))]
        programs_t = triton.cdiv(l, launch.positions * launch.tiles)
        dw_part = torch.empty((programs_t, b, channels, WIDTH), device=proj.device, dtype=torch.float32)
        db_part = torch.empty((programs_t, b, channels), device=proj.device, dtype=torch.float32)
        grid = (programs_t, b, triton.cdiv(channels, launch.channels))
        conv_bwd_kernel[grid](proj, weight, bias, *pieces, dproj, dw_part, db_part, l, channels, conv_width,
                              z_width, group_width, x_width, n, proj.stride(0), proj.stride(1),
                              *(st for g in pieces for st in g.stride()[:3]), dproj.stride(0), dproj.stride(1),
                              tiles=launch.tiles, BT=launch.positions, BC=launch.channels,
                              num_warps=launch.warps)
        dweight = dw_part.sum(dim=(0, 1)).view(weight.shape).to(weight.dtype)
        dbias = db_part.sum(dim=(0, 1)).to(bias.dtype)
        return dproj.view(proj.shape), None, None, dweight, dbias, None


def conv_split(proj: torch.Tensor, groups: int, widths: tuple[int, int, int, int], weight: torch.Tensor,
               bias: torch.Tensor, backward_launch: BackwardLaunch = DEFAULT_BACKWARD
               ) -> tuple[torch.Tensor | None, ...]:
    """proj (l, b, G * (z + x + 2N)), per group [z | x B C], widths = (z, x, N, N) -> z (l, b, G, z), a view of proj
    (None when z is 0 wide), and x (l, b, G, x), B, C (l, b, G, N): views of silu(causal_conv(xBC) + bias);
    weight (G * (x + 2N), 1, 4), bias (G * (x + 2N),). Differentiable; CUDA (or the Triton interpreter).
    backward_launch: the backward kernel's launch shape (bench/causal_conv.py compares them)."""
    z_width, x_width, n, n2 = widths
    channels = groups * (x_width + 2 * n)
    if weight.shape[-1] != WIDTH:
        raise ValueError(f"conv_split: the kernels take a conv width of {WIDTH}, got {weight.shape[-1]}")
    if n != n2 or proj.stride(-1) != 1 or proj.shape[-1] != groups * (z_width + x_width + 2 * n):
        raise ValueError(f"conv_split: proj {tuple(proj.shape)} (last dim contiguous) does not hold {groups} groups "
                         f"of widths {widths}")
    if weight.shape[0] != channels or bias.shape != (channels,):
        raise ValueError(f"conv_split: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match the "
                         f"{channels} conv channels")
    return _ConvSplit.apply(proj, groups, tuple(widths), weight.contiguous(), bias.contiguous(), backward_launch)
