"""Cross-entropy over a chunk of logits rows as one Triton kernel: each row's log-sum-exp and target logit, and,
when the whole vocabulary is on this device, the gradient (softmax - onehot(target)) * mask in the same program.

Why not torch.compile (the LM head's other path, `model/lm_loss.py`): Inductor reads a 4,096 x 50,304 bf16 chunk
twice for its log-sum-exp (the maximum, then the sum of exponentials) and once more for the gradient, from memory
each time: 0.95 ms per 1.3b micro-batch of 8K tokens on an H200. Here a program takes one row: an online
log-sum-exp (running maximum and rescaled sum) reads it once, and the gradient pass reads the same 100 KB again
while it is still in the L2 cache, so the logits come from memory once. fp32 math, the logits' dtype out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def cross_entropy_rows_kernel(logits_ptr, target_ptr, valid_ptr, mask_ptr, lse_ptr, picked_ptr, grad_ptr, V,
                              stride_logits, stride_grad, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK)
    running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # lanes that have seen only -inf so far keep a zero sum (exp(-inf - -inf) would be NaN)
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target = tl.load(target_ptr + row)
    valid = tl.load(valid_ptr + row) != 0
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(picked_ptr + row, tl.where(valid, picked, 0.0))
    if WITH_GRAD:
        weight = tl.load(mask_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where((c == target) & valid, 1.0, 0.0)) * weight
            tl.store(grad_ptr + row * stride_grad + c, g.to(grad_ptr.dtype.element_ty), mask=c < V)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                       mask: torch.Tensor | None = None):
    """logits (c, V) (last dim contiguous), target (c,) ids in [0, V) where `valid` (c,) bool -> (log-sum-exp (c,)
    fp32, target logit (c,) fp32, 0 where not valid) and, with `mask` (c,), the gradient of sum mask * CE by the
    logits, (softmax - onehot) * mask in logits' dtype (else None). CUDA, or the Triton interpreter on CPU."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows: logits (c, V) with a contiguous last dim expected, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    rows, V = logits.shape
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    picked = torch.empty_like(lse)
    grad = torch.empty_like(logits) if mask is not None else None
    if rows:
        cross_entropy_rows_kernel[(rows,)](
            logits, target, valid, mask if mask is not None else lse, lse, picked,
            grad if grad is not None else logits, V, logits.stride(0), grad.stride(0) if grad is not None else 0,
            WITH_GRAD=mask is not None, BLOCK=BLOCK, num_warps=4)
    return lse, picked, grad
