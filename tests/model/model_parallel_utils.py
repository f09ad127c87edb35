"""Helpers for the parallel-equivalence tests: a small model config and batch, and moving full (TP=1, PP=1)
weights into a sharded model and gathering sharded gradients back, using only megatron's own parameter attributes
(tensor_model_parallel, partition_dim, partition_stride) and layer numbers. Also used by tests/gpu/tp_pp_nccl_check.py.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

from transxssm_megatron.config import ModelConfig

BATCH, SEQ = 2, 40  # 40 = 2.5 SSD chunks of 16: covers state passing and a partial last chunk


def small_cfg(architecture: str, **overrides) -> ModelConfig:
    # 4 decoder layers with attention every 2nd, so TP and each PP stage see both mixers.
    return ModelConfig.from_preset("tiny", architecture=architecture, num_layers=4, attention_period=2,
                                   attention_offset=1, vocab_size=1000, ffn_hidden_size=256, ss_chunk_size=16,
                                   **overrides)


def batch(n_micro: int = 1):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1000, (n_micro, BATCH, SEQ + 1), generator=g)
    return ids[..., :-1], ids[..., 1:]


def tp_model_with(cfg: ModelConfig, full_weights: dict | None, sequence_parallel: bool = False):
    """This rank's model at the TP size of parallel_state, holding `full_weights` (sliced to this rank); with None,
    the model's own initial weights, returned as the full weights for the next run. -> (model, full_weights)"""
    from transxssm_megatron.model import build_model, build_transformer_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_model(cfg, build_transformer_config(cfg, tp=tp, sequence_parallel=sequence_parallel))
    if full_weights is None:
        full_weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        load_full_weights(model, full_weights)
    return model, full_weights


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of `full` for `param` (megatron layout: full split into size*stride chunks along
    partition_dim, rank r keeps chunks r, r+size, ...)."""
    if not is_tp_sharded(param) or size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def gather_full(local: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """Inverse of shard_of over the TP group: every rank gets the full tensor."""
    size = torch.distributed.get_world_size(group)
    if not is_tp_sharded(param) or size == 1:
        return local
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(size)], dim=dim)


def global_name(model, local_name: str) -> str:
    """decoder.layers.<local index>.x -> decoder.layers.<global index>.x (pipeline stages hold a slice);
    the last stage's copy of the tied embedding is named as the embedding."""
    if local_name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if not match:
        return local_name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


@torch.no_grad()
def load_full_weights(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full (TP=1, PP=1) weights into this rank's (sharded, staged) model."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        src = full[global_name(model, name)]
        param.copy_(shard_of(src, param, tp_rank, tp_size).to(param.dtype))


def full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of this rank's parameters, TP-gathered, keyed by global name (fp32, CPU). As megatron's
    finalize_model_grads would: gradients of `sequence_parallel` parameters (norms, skip weights; each rank saw
    part of the sequence) are summed over TP. The tied embedding appears once per stage that holds a copy;
    callers add the copies."""
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else getattr(param, "main_grad", None)
        if grad is None:
            continue
        key = global_name(model, name)
        if getattr(param, "sequence_parallel", False):
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=group)
        g = gather_full(grad, param, group).float().cpu()
        grads[key] = grads[key] + g if key in grads else g
    return grads
