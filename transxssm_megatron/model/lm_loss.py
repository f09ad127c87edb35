"""The LM head and the cross-entropy as one chunked function: the logits never exist whole.

    loss_sum = linear_cross_entropy(hidden, weight, labels, loss_mask, tp_group)

hidden (T, d), the final-norm output of every token; weight (V_local, d), this rank's rows of the (tied) output
matrix, vocab-parallel over TP; labels (T,) global token ids; loss_mask (T,) 0/1. Returns sum_t mask_t * CE_t as
an fp32 scalar (fp64 for fp64 inputs).

Why: megatron's path writes T x V logits, casts them to fp32 and keeps the softmax for backward; at 16K tokens and
a 50,304-token vocabulary that is 1.6 GB of bf16 logits and 3.3 GB per fp32 copy, each read and written several
times. Here tokens go through in chunks: per chunk the logits (in hidden's dtype), their log-sum-exp and the loss,
and at once the gradient (softmax - onehot) * mask, multiplied straight into d hidden and d weight (fp32
accumulation). Backward only scales those by the incoming scalar. On CUDA the per-chunk elementwise work is one
Triton kernel (`transxssm_kernels.cross_entropy`: the logits read from memory once); vocab-parallel, where the
log-sum-exp must be combined over ranks before the gradient, one compiled reduction and one pointwise kernel.

Where megatron's linear layers add their weight gradients into the fp32 `param.main_grad` themselves (gradient
accumulation fusion, training/wgrad_accumulation.py), pass that buffer as `main_grad`: the weight gradient's matmuls
then wait for backward, which knows the incoming scalar, and add d logits^T (scalar x hidden) into it, instead of
forming the gradient into an fp32 buffer in forward that backward scales and adds (a pass over 4 x V x d bytes
three times: 0.35 ms per 1.3b micro-batch); the chunks' d logits are kept until then (T x V in hidden's dtype).
Backward returns what megatron's linears return (`main_grad.weight_grad_stand_in`).

Vocab-parallel (TP > 1): the log-sum-exp and the target's logit are combined over the TP ranks with one
all-gather per chunk; d hidden is this rank's share, summed over ranks by the caller's region function (megatron's
copy-to / gather-from tensor-parallel region, exactly as around its own output layer).
"""

from __future__ import annotations

import torch

from .fused_ops import fusible, fusion_enabled
from .main_grad import accumulate_wgrad, weight_grad_stand_in

CHUNK_TOKENS = 4096  # logits of one chunk: 4096 x 50,304 bf16 = 412 MB


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@fusible
def logsumexp_and_target(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (c, V) -> log-sum-exp (c,) and the logit of target (c,) (0 where not `valid`), in fp32 (fp64 for
    fp64 logits)."""
    lf = logits.to(_math_dtype(logits))
    lse = torch.logsumexp(lf, dim=-1)
    picked = lf.gather(1, target.clamp(0, lf.shape[1] - 1)[:, None])[:, 0]
    return lse, torch.where(valid, picked, 0.0)


@fusible
def cross_entropy_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """d(sum mask * CE)/d logits = (softmax - onehot(target)) * mask, in logits' dtype. logits (c, V)."""
    probs = torch.exp(logits.to(lse.dtype) - lse[:, None])
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns[None, :] == target[:, None]) & valid[:, None]
    return ((probs - onehot.to(probs.dtype)) * mask[:, None]).to(logits.dtype)


def _combine_over_ranks(lse: torch.Tensor, picked: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank (log-sum-exp, target logit) over vocabulary shards -> the full vocabulary's."""
    parts = [torch.empty((2, lse.numel()), dtype=lse.dtype, device=lse.device) for _ in range(group.size())]
    torch.distributed.all_gather(parts, torch.stack([lse, picked]), group=group)
    stacked = torch.stack(parts)                                               # (tp, 2, c)
    return torch.logsumexp(stacked[:, 0], dim=0), stacked[:, 1].sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, tp_group, chunk_tokens, with_grads, main_grad):
        tp = tp_group.size() if tp_group is not None else 1
        vocab_local = weight.shape[0]
        first = (tp_group.rank() if tp > 1 else 0) * vocab_local
        want_dh, want_dw = with_grads and ctx.needs_input_grad[0], with_grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_dh else None
        acc = _math_dtype(hidden)
        defer_dw = want_dw and main_grad is not None   # d weight added into main_grad by backward (docstring)
        grad_logits_kept = []
        new = torch.empty if hidden.shape[0] else torch.zeros   # the first chunk writes it whole
        grad_weight = new(weight.shape, dtype=acc, device=weight.device) if want_dw and not defer_dw else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        one_kernel = tp == 1 and hidden.is_cuda and fusion_enabled() and hidden.dtype != torch.float64
        if one_kernel:   # the whole vocabulary here: log-sum-exp and gradient in one pass over the logits
            from transxssm_kernels.cross_entropy import cross_entropy_rows
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h, mask = hidden[rows], loss_mask[rows].to(acc)
            target = labels[rows] - first
            valid = (target >= 0) & (target < vocab_local)
            logits = h @ weight.t()                                            # (c, V_local)
            grad_logits = None
            if one_kernel:
                lse, picked, grad_logits = cross_entropy_rows(logits, target, valid,
                                                              mask if want_dh or want_dw else None)
            else:
                lse, picked = logsumexp_and_target(logits, target, valid)
            if tp > 1:
                lse, picked = _combine_over_ranks(lse, picked, tp_group)
            total += ((lse - picked) * mask).sum()
            if want_dh or want_dw:
                if grad_logits is None:
                    grad_logits = cross_entropy_grad(logits, lse, target, valid, mask)
                del logits
                if want_dh:
                    torch.mm(grad_logits, weight, out=grad_hidden[rows])
                if defer_dw:
                    grad_logits_kept.append(grad_logits)
                elif want_dw:
                    accumulate_wgrad(grad_weight, grad_logits, h, first=start == 0)
        ctx.save_for_backward(grad_hidden, grad_weight, hidden if defer_dw else None)
        ctx.weight, ctx.main_grad, ctx.grad_logits, ctx.chunk_tokens = weight, main_grad, grad_logits_kept, chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, hidden = ctx.saved_tensors
        # grad_total stays in fp32: a 0-dim fp32 factor scales bf16 tensors in fp32, rounding the product once
        dh = grad_hidden * grad_total if grad_hidden is not None else None
        dw = None
        if hidden is not None:       # deferred: main_grad += d logits^T (grad_total * hidden), chunk by chunk
            scaled = hidden * grad_total
            for i, grad_logits in enumerate(ctx.grad_logits):
                rows = slice(i * ctx.chunk_tokens, (i + 1) * ctx.chunk_tokens)
                accumulate_wgrad(ctx.main_grad, grad_logits, scaled[rows])
            ctx.grad_logits = None
            dw = weight_grad_stand_in(ctx.weight)
        elif grad_weight is not None:
            dw = (grad_weight * grad_total).to(ctx.weight.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                         tp_group=None, chunk_tokens: int = CHUNK_TOKENS,
                         main_grad: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t loss_mask_t * CE(hidden_t @ weight^T, labels_t), chunked; see the module docstring for shapes and for
    `main_grad` (weight's fp32 gradient buffer, added to in backward)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (T, d) and weight (V, d) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or loss_mask.shape != hidden.shape[:1]:
        raise ValueError(f"labels and loss_mask must have shape ({hidden.shape[0]},), got {tuple(labels.shape)} "
                         f"and {tuple(loss_mask.shape)}")
    if main_grad is not None and (main_grad.shape != weight.shape or not main_grad.is_floating_point()):
        raise ValueError(f"main_grad must be a floating-point buffer of weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(main_grad.shape)} {main_grad.dtype}")
    # Under no_grad (validation) the gradients are not formed: autograd.Function cannot tell from inside.
    return _LinearCrossEntropy.apply(hidden, weight, labels, loss_mask, tp_group, chunk_tokens,
                                     torch.is_grad_enabled(), main_grad)
