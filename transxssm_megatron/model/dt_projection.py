"""The SS mixer's dt projection with its input gradient added into in_proj's, in place.

    x_in, dt = project_dt(x, dt_weight, wgrad_into_main_grad)    # then in_proj(x_in)

x feeds two projections, in_proj (megatron's ColumnParallelLinear, 2,048 -> 10,240 at 1.3b) and dt_proj
(2,048 -> 32 heads). Autograd would form dt_proj's input gradient d dt @ W_dt as its own (l, b, d) tensor and then
add it to in_proj's in one more kernel: two writes and three reads of a whole activation per SS layer for a
K = 32 product (0.8 ms per 1.3b micro-batch of 8K tokens). Here dt_proj's backward only keeps (d dt, W_dt), and
an identity on in_proj's input adds d dt @ W_dt into in_proj's input gradient with one matmul that accumulates
(beta = 1) into it. The weight gradient is formed as megatron's linears do it: added into the fp32 `main_grad`
when asked (gradient accumulation fusion), else returned.

With a head count that is not a multiple of 8 (12 at 320m) the projection runs with the weight padded with zero
rows to the next multiple of 8: the output's rows are then a multiple of 16 bytes long, as cuBLAS's Hopper kernels
need, where rows of 12 took its unaligned sm80 kernels (`cutlass_80_..._align2`: 19-32 us for each of the three
products per 320m layer and micro-batch of 16K tokens, for ~10 us of memory traffic). dt is a view of the first H
columns; the pad columns' gradient is zero. The weight gradient is formed from a contiguous copy of d dt's first H
columns (T x 12 at 320m, a few microseconds): from the strided view of them cuBLAS ran its slowest kernel
(`cutlass_75_..._align1`, 0.64 ms per layer and micro-batch, against 19-31 us for each of the three products
before the padding) in a profiled Mamba-2 320m step (docs/performance.md).

Only for TP = 1 without context parallelism: there in_proj's input gradient is final when its backward returns
(no all-reduce or reduce-scatter over ranks follows inside megatron's linear). The join relies on dt_proj's
backward running first, which autograd's order gives (dt_proj is created after in_proj, and both wait on the SSD's
backward); a join that finds no pending gradient raises instead of dropping it.
"""

from __future__ import annotations

import torch

from .main_grad import accumulate_wgrad, weight_grad_stand_in


class _Pending:
    """dt_proj's (d dt, W_dt) waiting for in_proj's input gradient."""

    def __init__(self):
        self.grad_dt = self.weight = None


class _JoinInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        if p.grad_dt is None:
            raise RuntimeError("dt projection: in_proj's input gradient arrived before dt_proj's")
        grad = grad.contiguous()
        flat = grad.view(-1, grad.shape[-1])
        flat.addmm_(p.grad_dt.reshape(-1, p.grad_dt.shape[-1]), p.weight)
        p.grad_dt = p.weight = None
        return grad, None


class _DtProjection(torch.autograd.Function):
    """x @ padded^T, padded = weight with zero rows up to a multiple of 8; its gradient goes to weight."""

    @staticmethod
    def forward(ctx, x, weight, padded, pending, into_main_grad):
        ctx.save_for_backward(x, weight, padded)
        ctx.pending, ctx.into_main_grad = pending, into_main_grad
        return torch.matmul(x, padded.t())

    @staticmethod
    def backward(ctx, grad_dt):
        x, weight, padded = ctx.saved_tensors
        grad_dt = grad_dt.contiguous()   # (l, b, H padded); zero in the pad columns
        ctx.pending.grad_dt, ctx.pending.weight = grad_dt, padded
        g2 = grad_dt.view(-1, grad_dt.shape[-1])
        if g2.shape[1] != weight.shape[0]:
            g2 = g2[:, :weight.shape[0]].contiguous()   # see the module docstring: not a strided view
        x2 = x.reshape(-1, x.shape[-1])
        main_grad = getattr(weight, "main_grad", None) if ctx.into_main_grad else None
        if main_grad is None:
            return None, (g2.t() @ x2).to(weight.dtype), None, None, None
        accumulate_wgrad(main_grad, g2, x2)
        return None, weight_grad_stand_in(weight), None, None, None


def project_dt(x: torch.Tensor, weight: torch.Tensor, into_main_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x for in_proj, x @ weight^T) with dt_proj's input gradient added into in_proj's; x (l, b, d), weight
    (H, d). `into_main_grad`: add weight's gradient into its `main_grad` (megatron's gradient accumulation
    fusion)."""
    pending, heads = _Pending(), weight.shape[0]
    padded = weight.detach()
    if heads % 8:
        padded = torch.nn.functional.pad(padded, (0, 0, 0, 8 - heads % 8))
    x_in = _JoinInputGrad.apply(x, pending)   # made first, so that autograd runs dt_proj's backward before it
    return x_in, _DtProjection.apply(x, weight, padded, pending, into_main_grad)[..., :heads]
