"""Shared by the checkpoint tests: a tiny TransXSSM model with megatron's DDP, optimizer and scheduler on the
layout of parallel_state (gloo ranks from tests/distributed.py)."""

import torch

SEQ, MICRO_BATCH, VOCAB = 16, 2, 256


def build_trainable(seed: int, lr: float = 3e-3):
    """This rank's DDP-wrapped model chunk, megatron optimizer and scheduler (layout from parallel_state)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from transxssm_megatron.config import ModelConfig
    from transxssm_megatron.model.builder import build_model, build_transformer_config
    from transxssm_megatron.training.cpu_backend import install_cpu_backend

    install_cpu_backend()
    cfg = ModelConfig.from_preset("tiny", hidden_size=64, ffn_hidden_size=128, state_size=16, vocab_size=VOCAB,
                                  max_seq_length=SEQ)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tconfig = build_transformer_config(cfg, tp=tp, pp=pp, use_cpu_initialization=True, batch_p2p_sync=False)
    torch.manual_seed(seed)
    model = build_model(cfg, tconfig)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr / 10, weight_decay=0.1, clip_grad=1.0), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=lr / 10, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=10, wd_incr_style="constant")
    return [model], optimizer, scheduler
