"""The token embedding's lookup with its weight gradient added straight into megatron's fp32 `main_grad`.

    hidden = embed_into_main_grad(ids, weight, main_grad, give_grad)    # ids (l, b) -> (l, b, d)

Where megatron's linear layers add their weight gradients into `param.main_grad` themselves (gradient accumulation
fusion, training/wgrad_accumulation.py), the embedding is the one weight left whose gradient goes the long way:
F.embedding's backward builds a dense (V, d) gradient in bf16 (a fill, a sort and a scatter over 50K x d) and
megatron's DDP hook adds it to the fp32 buffer (1.15 ms per 8K-token micro-batch of the 1.3b model on an H200,
nearly all of it that add). Here backward adds the looked-up rows' gradients into main_grad with one index_add_,
in fp32, and returns what megatron's linear layers return after adding theirs: an uninitialised tensor marked
`grad_added_to_main_grad`, so that the DDP hook still runs for the weight (it starts the bucket's reduction when
overlapping) and adds nothing; or, with give_grad False, nothing (the tied LM head on the same stage returns
that tensor).

index_add_ adds in any order on CUDA: runs that ask for deterministic algorithms use megatron's lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, main_grad, give_grad):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.main_grad, ctx.give_grad = weight, main_grad, give_grad
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        ctx.main_grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(ctx.main_grad.dtype))
        stand_in = None
        if ctx.give_grad:
            ctx.weight.grad_added_to_main_grad = True
            stand_in = torch.empty_like(ctx.weight)
        return None, stand_in, None, None


def embed_into_main_grad(ids: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor,
                         give_grad: bool = True) -> torch.Tensor:
    """weight[ids] (ids any shape, int; result ids.shape + (d,)); backward adds into main_grad (V, d), see the
    module docstring for give_grad."""
    if main_grad.shape != weight.shape:
        raise ValueError(f"main_grad must have the embedding's shape {tuple(weight.shape)}, got "
                         f"{tuple(main_grad.shape)}")
    return _EmbeddingIntoMainGrad.apply(ids, weight, main_grad, give_grad)
