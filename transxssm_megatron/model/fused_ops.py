"""The elementwise work between the matmuls, as plain PyTorch functions that torch.compile fuses on CUDA.

Every function here is its own reference: called eagerly it is a few readable PyTorch ops (CPU runs and the
unfused path use it as is); on a CUDA tensor with fusion on, `@fusible` calls its torch.compile'd twin instead,
which Inductor turns into one generated Triton kernel forward and one or two backward, in place of 5-20 eager
kernels each reading and writing whole activations. The matmuls (megatron's parallel linears), the SSD kernel
and attention stay outside: they are already single kernels, and sharding (TP / SP) lives in the linears.

    set_fusion(False)          # process-wide: every call below runs eagerly (the reference path)

Shapes follow megatron's sequence-first layout: (l, b, ...) in and out unless a docstring says otherwise.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from .main_grad import weight_grad_stand_in

log = logging.getLogger(__name__)
_enabled = True
_announced = False


def set_fusion(enabled: bool) -> None:
    """Turn the compiled twins on or off for the whole process (the trainer sets it from `train.fused`)."""
    global _enabled
    _enabled = bool(enabled)


def fusion_enabled() -> bool:
    return _enabled


def conv_kernels_chosen(width: int) -> bool:
    """Whether a causal conv1d of this width runs in transxssm_kernels.causal_conv (on CUDA, fusion on): width 4,
    the kernels' one, unless TRANSXSSM_CONV_KERNELS=0 keeps it compiled."""
    return width == 4 and os.environ.get("TRANSXSSM_CONV_KERNELS", "1") != "0"


def _announce(device_type: str) -> None:
    global _announced
    if not _announced:
        _announced = True
        if device_type == "cuda":
            log.info("elementwise ops: torch.compile'd (fused) on CUDA")
        else:
            log.info("elementwise ops: eager PyTorch on %s (fusion needs CUDA)", device_type)


def fusible(fn):
    """Run `fn` compiled (fullgraph, static shapes) when its first tensor argument is on CUDA and fusion is on,
    else eagerly. `fn.reference` is the eager function."""
    compiled = None

    @functools.wraps(fn)
    def call(first, *args):
        nonlocal compiled
        _announce(first.device.type)
        if _enabled and first.is_cuda:
            if compiled is None:
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            return compiled(first, *args)
        return fn(first, *args)

    call.reference = fn
    return call


# ----------------------------------------------------------------------------------------------- norms, residual
@fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C) / rms over C, times weight (C,); fp32 math, x's dtype out (docs/model.md §4)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _skip_add(h: torch.Tensor, skip_weight: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    return (h if skip_weight is None else h * skip_weight) + update


skip_add = fusible(_skip_add)
skip_add.__doc__ = "h' = w ⊙ h + update (h + update when w is None): the residual of a pre-norm sub-layer."


@fusible
def _skip_add_norm(h: torch.Tensor, skip_weight: torch.Tensor | None, update: torch.Tensor,
                   norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = _skip_add(h, skip_weight, update)
    return out, rms_norm.reference(out, norm_weight, eps)


class _SkipAddNorm(torch.autograd.Function):
    """`forward` (the compiled or the eager function) forward; backward the Triton kernels of
    transxssm_kernels.residual_norm, adding the weights' gradients into their `main_grad` where asked."""

    @staticmethod
    def forward(ctx, h, skip_weight, update, norm_weight, eps, forward, into_main_grad):
        out, normed = forward(h, skip_weight, update, norm_weight, eps)
        ctx.set_materialize_grads(False)   # h' unused (the last sub-layer before the final norm): no zeros read
        ctx.save_for_backward(h if skip_weight is not None else None, out, skip_weight, norm_weight)
        ctx.eps, ctx.into_main_grad = eps, into_main_grad
        return out, normed

    @staticmethod
    def backward(ctx, dout, dnormed):
        from transxssm_kernels.residual_norm import skip_add_norm_backward

        h, out, w, v = ctx.saved_tensors
        dnormed = torch.zeros_like(out) if dnormed is None else dnormed
        into = [getattr(p, "main_grad", None) if ctx.into_main_grad and p is not None else None for p in (w, v)]
        dh, du, dw, dv = skip_add_norm_backward(dout, dnormed, h, out, w, v, ctx.eps, *into)
        dw = weight_grad_stand_in(w) if into[0] is not None else dw
        dv = weight_grad_stand_in(v) if into[1] is not None else dv
        return dh, dw, du, dv, None, None, None


def skip_add_norm(h: torch.Tensor, skip_weight: torch.Tensor | None, update: torch.Tensor,
                  norm_weight: torch.Tensor, eps: float, into_main_grad: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', RMSNorm(h')) with h' = w ⊙ h + update: one sub-layer's residual and the next one's pre-norm in one
    pass (h' is read once instead of being written, read back and normalised separately).

    On CUDA with fusion on: compiled forward, and a Triton backward (transxssm_kernels.residual_norm) that forms
    both weights' gradients in the same pass over the rows; with `into_main_grad` it adds them into the weights'
    fp32 `main_grad` where they have one (megatron's gradient accumulation fusion, as its linear layers do)."""
    _announce(h.device.type)
    if _enabled and h.is_cuda:
        return _SkipAddNorm.apply(h, skip_weight, update, norm_weight, eps, _skip_add_norm, into_main_grad)
    return _skip_add_norm.reference(h, skip_weight, update, norm_weight, eps)


skip_add_norm.reference = _skip_add_norm.reference


def _skip_add_norm_kernels(h, skip_weight, update, norm_weight, eps, into_main_grad=False):
    """skip_add_norm's Triton backward after the eager forward, on any device (CPU: the Triton interpreter)."""
    return _SkipAddNorm.apply(h, skip_weight, update, norm_weight, eps, _skip_add_norm.reference, into_main_grad)


skip_add_norm.with_kernels = _skip_add_norm_kernels


# ------------------------------------------------------------------------------------------------------ FFN
def _swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim (megatron's gated-linear-unit order); fp32 math."""
    gate, up = h.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`_swiglu`; on CUDA with fusion on, the Triton kernels of transxssm_kernels.swiglu, whose backward reads
    gate, up and the gradient once (Inductor's reads them twice: see that module)."""
    _announce(h.device.type)
    if _enabled and h.is_cuda:
        from transxssm_kernels.swiglu import swiglu as swiglu_kernels

        return swiglu_kernels(h)
    return _swiglu(h)


swiglu.reference = _swiglu


# ------------------------------------------------------------------------------------------------ attention
@fusible
def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_per_group: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused QKV projection and apply RoPE to q and k.

    qkv (l, b, groups, heads_per_group + 2, D) -> q (b, heads, l, D), k, v (b, groups, l, D), the layout SDPA
    reads. cos, sin fp32 (l, D/2) or (b, l, D/2), rotate_half pairing (dim i with i + D/2); fp32 math."""
    l, b, groups, _, D = qkv.shape
    q, k, v = qkv.split([heads_per_group, 1, 1], dim=3)
    q = q.reshape(l, b, groups * heads_per_group, D)
    k, v = k.squeeze(3), v.squeeze(3)
    if cos.dim() == 2:
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]        # (l, 1, 1, D/2)
    else:
        cos, sin = cos.transpose(0, 1)[:, :, None], sin.transpose(0, 1)[:, :, None]   # (l, b, 1, D/2)

    def rotate(t):
        t1, t2 = t.float().chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(t.dtype)

    as_bhld = lambda t: t.permute(1, 2, 0, 3).contiguous()
    return as_bhld(rotate(q)), as_bhld(rotate(k)), as_bhld(v)


# ------------------------------------------------------------------------------------------------ SS mixer
def split_projection(proj: torch.Tensor, groups: int, widths: tuple[int, int, int, int],
                     conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The SS mixer's in_proj output, laid out per group as [z | x B C], into the SSD's inputs.

    proj (l, b, groups * sum(widths)), widths = (z, x, N, N) channels per group -> z (l, b, groups, z) or None,
    x (l, b, groups, x), B, C (l, b, groups, N). With conv_weight (C, 1, w) and conv_bias (C,) over the x|B|C
    channels, those pass through the causal conv + SiLU first (`causal_conv_silu`). x, B and C are strided views
    (of proj, or of the conv's output): the SSD kernels read any strides, so nothing is copied forward.
    Backward: without z and conv (TransXSSM's mixer) the SSD kernels write the gradients of x, B, C as views of one
    tensor laid out like proj, which `split_last_dim` passes on as proj's gradient, no copy; otherwise one compiled
    write of proj's gradient from the pieces'. With fusion on CUDA the conv (width 4) runs in the Triton kernels of
    transxssm_kernels.causal_conv, which read and write the activations once (Mamba-2 320m 9% faster than with
    Inductor's conv on an H200, docs/performance.md); TRANSXSSM_CONV_KERNELS=0 keeps it compiled."""
    if widths[0] == 0 and conv_weight is None:
        l, b = proj.shape[:2]
        return (None, *split_last_dim(proj.view(l, b, groups, -1), widths[1:]))
    _announce(proj.device.type)
    if _enabled and proj.is_cuda and conv_weight is not None and conv_kernels_chosen(conv_weight.shape[-1]):
        from transxssm_kernels.causal_conv import conv_split

        return conv_split(proj, groups, widths, conv_weight, conv_bias)
    return _split_projection(proj, groups, widths, conv_weight, conv_bias)


class _SplitLastDim(torch.autograd.Function):
    """t.split(widths, dim=-1) whose backward passes the pieces' gradients on without a copy when they are views
    of one tensor laid out as the pieces are in t (the SSD kernels return them so), and concatenates them
    otherwise."""

    @staticmethod
    def forward(ctx, t, widths):
        pieces = t.split(list(widths), dim=-1)
        ctx.shape = t.shape
        ctx.layout = [(p.shape, p.stride(), p.storage_offset() - t.storage_offset()) for p in pieces]
        ctx.contiguous = t.is_contiguous()
        return pieces

    @staticmethod
    def backward(ctx, *grads):
        whole = grads[0]._base if grads[0] is not None else None
        if (ctx.contiguous and whole is not None and whole.is_contiguous() and whole.numel() == ctx.shape.numel()
                and all(g is not None and g._base is whole
                        and (g.shape, g.stride(), g.storage_offset() - whole.storage_offset()) == layout
                        for g, layout in zip(grads, ctx.layout))):
            return whole.view(ctx.shape), None
        ref = next(g for g in grads if g is not None)
        grads = [torch.zeros(layout[0], dtype=ref.dtype, device=ref.device) if g is None else g
                 for g, layout in zip(grads, ctx.layout)]
        return torch.cat(grads, dim=-1), None


def split_last_dim(t: torch.Tensor, widths) -> tuple[torch.Tensor, ...]:
    """t.split(widths, dim=-1), views of t; see _SplitLastDim for the backward."""
    return _SplitLastDim.apply(t, tuple(widths))


@fusible
def _split_projection(proj: torch.Tensor, groups: int, widths: tuple[int, int, int, int],
                      conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """split_projection with z or the causal conv: one compiled kernel forward (with the conv) and backward."""
    l, b = proj.shape[:2]
    z_w, x_w, n, _ = widths
    z, xbc = proj.view(l, b, groups, -1).split([z_w, x_w + 2 * n], dim=-1)
    if conv_weight is not None:
        xbc = causal_conv_silu(xbc.reshape(l, b, -1), conv_weight, conv_bias).view(l, b, groups, -1)
    x, B, C = xbc.split([x_w, n, n], dim=-1)
    return (z if z_w else None), x, B, C


split_projection.reference = _split_projection.reference


def causal_conv_silu(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv along l + SiLU. xbc (l, b, C) -> same; weight (C, 1, w), bias (C,).

    Written as w shifted multiply-adds over the sequence rather than a convolution call: with the channels
    contiguous, torch.compile makes it part of the elementwise kernel around it (`split_projection`), where a
    depthwise conv1d call would be a separate, slow kernel on transposed copies."""
    l, width = xbc.shape[0], weight.shape[-1]
    x = F.pad(xbc.float(), (0, 0, 0, 0, width - 1, 0))          # (l + w - 1, b, C): zeros before the start
    w = weight.float()[:, 0, :]                                 # (C, w)
    acc = bias.float() + sum(x[k:k + l] * w[:, k] for k in range(width))
    return F.silu(acc).to(xbc.dtype)


@fusible
def _gate_norm(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
               eps: float, group_size: int) -> torch.Tensor:
    """Mamba-2's output gate: RMSNorm((y + D x) * silu(z)) over groups of `group_size` channels, times weight.

    y, x, z (l, b, H, P); D (H,) or None; weight (H * P,). Returns (l, b, H * P); fp32 math, y's dtype out."""
    out = y.float()
    if D is not None:
        out = out + D.float()[:, None] * x.float()
    out = out * F.silu(z.float())
    l, b = out.shape[:2]
    grouped = out.reshape(l, b, -1, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (grouped.reshape(l, b, -1) * weight.float()).to(y.dtype)


def gate_norm(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
              eps: float, group_size: int) -> torch.Tensor:
    """`_gate_norm`; on CUDA with fusion on, the Triton kernels of transxssm_kernels.gate_norm, whose backward reads
    the inputs once (Inductor's read them once per weight gradient: see that module)."""
    _announce(y.device.type)
    if _enabled and y.is_cuda:
        from transxssm_kernels.gate_norm import gate_norm as gate_norm_kernels

        return gate_norm_kernels(y, x, D, z, weight, eps, group_size)
    return _gate_norm(y, x, D, z, weight, eps, group_size)


gate_norm.reference = _gate_norm.reference
