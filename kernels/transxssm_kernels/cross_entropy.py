"""Cross-entropy over a chunk of logits rows as one Triton kernel: each row's log-sum-exp and target logit, and,
when the whole vocabulary is on this device, the gradient (softmax - onehot(target)) * mask in the same program.

Why not torch.compile (the LM head's other path, `model/lm_loss.py`): Inductor reads a 4,096 x 50,304 bf16 chunk
twice for its log-sum-exp (the maximum, then the sum of exponentials) and once more for the gradient, from memory
each time. Here a program takes one row: an online log-sum-exp reads it once, and the gradient pass reads the same
100 KB again while it is still in the L2 cache, so the logits come from memory once. The running maximum is one
number per row, updated once per block of columns, so each logit costs one exponential per pass (a maximum per
lane rescaled the lane's sum by a second exponential per logit: with three per logit the kernel was bound by the
exponential unit: 0.44 against 0.31 ms per 4,096-row chunk on an H200, bench/results/cross-entropy-2026-12-04.json).
Exponentials in base 2, fp32 math, the logits' dtype out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096   # columns at a time
WARPS = 8
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def cross_entropy_rows_kernel(logits_ptr, target_ptr, valid_ptr, mask_ptr, lse_ptr, picked_ptr, grad_ptr, V,
                              stride_logits, stride_grad, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK)
    running_max = tl.full((), float("-inf"), tl.float32)   # of the logits times log2(e), like the sum's terms
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * LOG2E
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # while only -inf has been seen the sum stays 0 (exp2(-inf - -inf) would be NaN)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.math.exp2(running_max - shift) + tl.sum(tl.math.exp2(x - shift), axis=0)
        running_max = new_max
    lse2 = running_max + tl.math.log2(running_sum)          # log-sum-exp in base 2
    target = tl.load(target_ptr + row)
    valid = tl.load(valid_ptr + row) != 0
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse2 / LOG2E)
    tl.store(picked_ptr + row, tl.where(valid, picked, 0.0))
    if WITH_GRAD:
        weight = tl.load(mask_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            g = (tl.math.exp2(x * LOG2E - lse2) - tl.where((c == target) & valid, 1.0, 0.0)) * weight
            tl.store(grad_ptr + row * stride_grad + c, g.to(grad_ptr.dtype.element_ty), mask=c < V)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                       mask: torch.Tensor | None = None, block: int = BLOCK, warps: int = WARPS):
    """logits (c, V) (last dim contiguous), target (c,) ids in [0, V) where `valid` (c,) bool -> (log-sum-exp (c,)
    fp32, target logit (c,) fp32, 0 where not valid) and, with `mask` (c,), the gradient of sum mask * CE by the
    logits, (softmax - onehot) * mask in logits' dtype (else None). CUDA, or the Triton interpreter on CPU.
    `block` columns at a time, `warps` per program (one program per row)."""
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
            WITH_GRAD=mask is not None, BLOCK=block, num_warps=warps)
    return lse, picked, grad
