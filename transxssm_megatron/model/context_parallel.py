"""Context parallelism (CP) inside the mixers: the all-to-alls of the Ulysses scheme.

Outside the mixers every rank of a CP group of size c holds a contiguous 1/c of the sequence and every channel
(embedding, norms, FFN, LM head work token by token). Attention and the SSD scan need the whole sequence, so each
mixer, after its input projection, trades sequence for heads:

    seq_to_heads:  (l/c, b, c * w)  ->  (l, b, w)      this rank's 1/c of the heads, the whole sequence
    heads_to_seq:  (l, b, w)        ->  (l/c, b, c * w)  back, before the output projection

The channels must be laid out head (or group) by head, so that chunk j of the last dim (w channels) is the j-th
1/c of the heads; both mixers' projections are (see their docstrings). The sequence blocks are ordered by CP rank,
rank r holding positions [r * l/c, (r + 1) * l/c). Each function is the other's gradient.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def cp_group_of(pg_collection):
    """The context-parallel group megatron's process-group collection names, else the global one."""
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    return parallel_state.get_context_parallel_group(check_initialized=False)


def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """send (c, ...) contiguous: block j goes to rank j; returns (c, ...) with block j from rank j."""
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)
    return recv


def _seq_to_heads(t: torch.Tensor, group) -> torch.Tensor:
    c = group.size()
    l_local, b, width = t.shape
    send = t.reshape(l_local, b, c, width // c).permute(2, 0, 1, 3).contiguous()   # (c, l/c, b, w)
    return _all_to_all(send, group).reshape(c * l_local, b, width // c)


def _heads_to_seq(t: torch.Tensor, group) -> torch.Tensor:
    c = group.size()
    l, b, w = t.shape
    recv = _all_to_all(t.reshape(c, l // c, b, w).contiguous(), group)               # (c, l/c, b, w)
    return recv.permute(1, 2, 0, 3).reshape(l // c, b, c * w)


class _AllToAll(torch.autograd.Function):
    """`forward` moves t one way (seq_to_heads or heads_to_seq), `backward` moves its gradient the other way."""

    @staticmethod
    def forward(ctx, t, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(t, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


def seq_to_heads(t: torch.Tensor, group) -> torch.Tensor:
    """(l/c, b, c * w) sequence-sharded, all heads -> (l, b, w) full sequence, this rank's heads. Identity at c = 1."""
    if group is None or group.size() == 1:
        return t
    if t.dim() != 3 or t.shape[-1] % group.size():
        raise ValueError(f"seq_to_heads: expected (l, b, channels) with channels divisible by cp={group.size()}, "
                         f"got {tuple(t.shape)}")
    return _AllToAll.apply(t, group, _seq_to_heads, _heads_to_seq)


def heads_to_seq(t: torch.Tensor, group) -> torch.Tensor:
    """(l, b, w) full sequence, this rank's heads -> (l/c, b, c * w) sequence-sharded, all heads."""
    if group is None or group.size() == 1:
        return t
    if t.dim() != 3 or t.shape[0] % group.size():
        raise ValueError(f"heads_to_seq: expected (l, b, channels) with l divisible by cp={group.size()}, "
                         f"got {tuple(t.shape)}")
    return _AllToAll.apply(t, group, _heads_to_seq, _seq_to_heads)


def gather_sequence(t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Concatenate the CP ranks' sequence blocks of a tensor that needs no gradient (position ids), along `dim`."""
    if group is None or group.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
