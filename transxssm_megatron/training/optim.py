"""AdamW + learning-rate schedule of docs/model.md §7, on megatron-core's optimizer and scheduler.

    optimizer = build_optimizer(cfg, model_chunks, world)   # MegatronOptimizer (distributed on GPU)
    scheduler = build_scheduler(cfg, optimizer)              # OptimizerParamScheduler

AdamW (beta1, beta2, eps from `optim`), decoupled weight decay on matrices only: parameters the model marks
with `no_weight_decay = True` (skip weights, A_log, D, dt_bias), every 1-D parameter (norms) and biases get
`wd_mult = 0` through megatron's param-group overrides. bf16 runs keep fp32 master weights and fp32 grads
(megatron's mixed-precision optimizer); the distributed optimizer shards that state over data parallel ranks.
Schedule: linear warmup from 0 over `warmup_fraction * steps`, cosine decay to `min_lr_ratio * lr` at the last
step.
"""

from __future__ import annotations

import torch

NO_WEIGHT_DECAY_ATTR = "no_weight_decay"


def no_weight_decay_overrides():
    """Megatron param-group override: wd_mult 0 for marked params, 1-D params and biases."""
    from megatron.core.optimizer import ParamKey, ParamPredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    key = ParamKey(
        name="*.bias",
        attr=NO_WEIGHT_DECAY_ATTR,
        predicate=ParamPredicate(name="one_dimensional", fn=lambda param: param.dim() <= 1),
    )
    return {key: ParamGroupOverride(wd_mult=0.0)}


def optimizer_config(cfg, world, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig

    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        decoupled_weight_decay=True,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=world.on_gpu and cfg.parallel.use_distributed_optimizer,
    )


def build_optimizer(cfg, model_chunks, world, bf16: bool):
    """megatron get_megatron_optimizer over the DDP-wrapped chunks, with our weight-decay groups."""
    from megatron.core.optimizer import get_megatron_optimizer

    config = optimizer_config(cfg, world, bf16)
    config.overlap_param_gather = any(chunk.ddp_config.overlap_param_gather for chunk in model_chunks)
    return get_megatron_optimizer(config, model_chunks, config_overrides=no_weight_decay_overrides())


def build_scheduler(cfg, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, cfg.train.steps
    warmup = int(o.warmup_fraction * steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # the config in force wins over a checkpoint's (e.g. more steps)
    )


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            lr = group["lr"]
            return float(lr.item() if torch.is_tensor(lr) else lr)
    return float("nan")
