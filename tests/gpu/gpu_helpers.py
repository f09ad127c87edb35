"""Shared by the one-GPU tests: a one-rank NCCL group with megatron's parallel state, and a model built on it."""

import socket

import torch


def init_single_gpu():
    """One-rank NCCL group + megatron parallel state (idempotent)."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        # A free port given to this group only: MASTER_PORT in the environment would reach the `transxssm train`
        # processes other GPU tests start, which would then try to take this same port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build(cfg, dtype):
    from transxssm_megatron.model import build_model, build_transformer_config

    init_single_gpu()
    torch.manual_seed(0)
    tc = build_transformer_config(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = build_model(cfg, tc)
    assert next(model.parameters()).is_cuda
    return model
