"""The self-attention (SA) mixer (docs/model.md §3): causal multi-head attention with Unified RoPE on Q/K, optional GQA.

`linear_qkv` is megatron's ColumnParallelLinear, `linear_proj` its RowParallelLinear, both without bias. Like
megatron's own attention, QKV rows are laid out per KV group so that a TP shard is a contiguous slice of a
TP-independent weight (num_query_groups % tp == 0):

    linear_qkv rows = [group 0 | ... | group g-1],   group = [q (heads/g x 64) | k (64) | v (64)]

Attention kernel: PyTorch SDPA (flash / cuDNN / efficient backends) on CUDA; on CPU an explicit softmax path
(fp32 scores), which doubles as the readable reference. Softmax scale 1/sqrt(head_dim). No dropout.
Context parallelism (docs/training.md): with the sequence split over cp ranks, the QKV projection of this rank's
block goes through one all-to-all (`context_parallel.seq_to_heads`) to the whole sequence of 1/cp of this TP
shard's KV groups (whole groups, so num_query_groups % (tp * cp) == 0), RoPE and causal attention run there with
positions 0..l-1, and the output goes back to sequence blocks before linear_proj.

Shapes: hidden_states (l, b, d) in and out (megatron's sequence-first layout; l is this CP rank's block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from ..config import ModelConfig
from .fused_ops import rotate_qkv
from .context_parallel import cp_group_of, heads_to_seq, seq_to_heads
from .groups import tp_group_of
from .rope import RopeTables


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention. q, k, v (b, heads, l, D) -> (b, heads, l, D); fp32 scores."""
    l = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(l, l, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


class SelfAttentionMixer(MegatronModule):
    """Causal self-attention with RoPE tables from the model. Built from a ModuleSpec carrying `model_cfg`."""

    def __init__(self, config, model_cfg: ModelConfig, layer_number: int = 1, pg_collection=None, **unused):
        super().__init__(config=config)
        self.model_cfg = m = model_cfg
        self.layer_number = layer_number
        self.tp_group = tp_group_of(pg_collection)
        tp = self.tp_group.size()
        self.cp_group = cp_group_of(pg_collection)
        cp = self.cp_group.size() if self.cp_group is not None else 1
        self.head_dim = m.head_dim
        self.heads_local = m.num_attention_heads // (tp * cp)      # the heads this rank attends with
        self.groups_local = m.num_query_groups // (tp * cp)
        self.heads_per_group = m.num_attention_heads // m.num_query_groups

        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            m.hidden_size, (m.num_attention_heads + 2 * m.num_query_groups) * self.head_dim, config=config,
            init_method=config.init_method, bias=False, gather_output=False, tp_group=self.tp_group)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            m.num_attention_heads * self.head_dim, m.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.tp_group)

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        if rope is None:
            raise ValueError("SelfAttentionMixer needs the model's RopeTables (rope.attention)")
        qkv, _ = self.linear_qkv(hidden_states)                                    # (l/cp, b, groups_tp * ...)
        qkv = seq_to_heads(qkv, self.cp_group)                                     # (l, b, groups_loc * ...)
        l, b = qkv.shape[:2]
        qkv = qkv.view(l, b, self.groups_local, self.heads_per_group + 2, self.head_dim)
        q, k, v = rotate_qkv(qkv, *rope.attention, self.heads_per_group)           # (b, heads, l, D)
        if q.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads_per_group > 1)
        else:
            if self.heads_per_group > 1:  # GQA: each KV head serves heads_per_group consecutive query heads
                k = k.repeat_interleave(self.heads_per_group, dim=1)
                v = v.repeat_interleave(self.heads_per_group, dim=1)
            out = causal_attention_reference(q, k, v)
        out = out.permute(2, 0, 1, 3).reshape(l, b, self.heads_local * self.head_dim)  # (l, b, heads * D)
        out = heads_to_seq(out, self.cp_group)                                     # (l/cp, b, heads_tp * D)
        out, _ = self.linear_proj(out)
        return out
