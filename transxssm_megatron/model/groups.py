"""The tensor-parallel group a layer works in: the one megatron's process-group collection names, else the global one."""

from __future__ import annotations

from megatron.core import parallel_state


def tp_group_of(pg_collection):
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    return parallel_state.get_tensor_model_parallel_group()
