"""Weight gradients added straight into megatron's fp32 `param.main_grad`, and what backward then returns.

Where megatron's linear layers add their weight gradients into `main_grad` themselves (gradient accumulation
fusion, training/wgrad_accumulation.py), the other layers that can do the same (the LM head, the embedding's
lookup, dt_proj, the norms' backward) use these two helpers, so that megatron's DDP hook sees what it sees from its
own linears.
"""

from __future__ import annotations

import torch


def accumulate_wgrad(acc: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor, first: bool = False) -> None:
    """acc (out, in) += grad_out (T, out)^T @ inputs (T, in) (acc = ... when `first`: acc may be uninitialised);
    bf16/fp16 operands accumulate in fp32 inside the matmul on CUDA."""
    if acc.is_cuda and grad_out.dtype != acc.dtype:
        torch.addmm(acc, grad_out.t(), inputs, beta=0.0 if first else 1.0, out_dtype=acc.dtype, out=acc)
    elif first:
        acc.copy_(grad_out.t() @ inputs)
    else:
        acc.add_((grad_out.t() @ inputs).to(acc.dtype))


def weight_grad_stand_in(weight: torch.Tensor) -> torch.Tensor | None:
    """What backward returns for a weight whose gradient it has added to main_grad, as megatron's linear layers do
    (the callers above): None when megatron marks the weight `zero_out_wgrad` (the embedding and the LM head
    share it on this pipeline stage: the hook adds whatever gradient arrives, the other user's), else an
    uninitialised tensor marked as already added, so that megatron's DDP hook still runs for it (it starts the
    bucket's reduction when overlapping) and adds nothing."""
    if getattr(weight, "zero_out_wgrad", False):
        return None
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)
