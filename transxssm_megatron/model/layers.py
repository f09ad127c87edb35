"""Pre-norm residual sub-layers with learnable skip weights (docs/model.md §4).

A TransXSSM decoder layer is two HybridStack layers, each one `ResidualLayer`:

    h = w_mix ⊙ h + Mixer(RMSNorm(h))        # Mixer = SSMixer ('M') or SelfAttentionMixer ('*')
    h = w_ffn ⊙ h + SwiGLU(RMSNorm(h))       # '-'

`w` is a per-channel weight on the skip path (init 1, `no_weight_decay`); with `residual_weights: false` it is
absent and the layer is the plain residual h + f(RMSNorm(h)). Every sub-layer receives the model's RopeTables;
the FFN ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..config import ModelConfig
from .fused_ops import skip_add, skip_add_norm, swiglu
from .norms import RMSNorm, param_device
from .rope import RopeTables
from .groups import tp_group_of


class SwiGLU(MLP):
    """megatron's MLP with a gated linear unit: down(silu(gate(u)) * up(u)), no bias (the TransformerConfig from
    build_transformer_config sets gated_linear_unit, activation_func=silu, add_bias_linear=False)."""

    def __init__(self, config, submodules, model_cfg: ModelConfig, layer_number: int = 1, pg_collection=None,
                 **unused):
        super().__init__(config, submodules, ffn_hidden_size=model_cfg.ffn_hidden_size,
                         tp_group=tp_group_of(pg_collection))
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        gate_up, _ = self.linear_fc1(hidden_states)
        out, _ = self.linear_fc2(swiglu(gate_up))
        return out


@dataclass
class ResidualLayerSubmodules:
    mixer: Union[ModuleSpec, type]


class ResidualLayer(MegatronModule):
    """One pre-norm residual sub-layer; `layer_number` is 1-based over the whole stack (as megatron's)."""

    def __init__(self, config, submodules: ResidualLayerSubmodules, model_cfg: ModelConfig, layer_number: int = 1,
                 pg_collection=None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.norm = RMSNorm(config.hidden_size, eps=model_cfg.norm_eps, sequence_parallel=config.sequence_parallel,
                            dtype=config.params_dtype, device=param_device(config))
        self.mixer = build_module(submodules.mixer, config=config, model_cfg=model_cfg, layer_number=layer_number,
                                  pg_collection=pg_collection)
        self.skip_weight = None
        if model_cfg.residual_weights:
            self.skip_weight = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype,
                                                             device=param_device(config)))
            self.skip_weight.no_weight_decay = True
            self.skip_weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor, normed: torch.Tensor, rope: RopeTables | None,
                next_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, RMSNorm(h)) -> (h', next_norm(h')), h' = w ⊙ h + Mixer(RMSNorm(h)); all (l, b, d).

        The stack computes each pre-norm together with the residual before it (one fused pass); `next_norm` is the
        following sub-layer's norm (or the final one), None at the end of a pipeline stage (then only h')."""
        update = self.mixer(normed, rope=rope)
        if next_norm is None:
            return skip_add(hidden_states, self.skip_weight, update), None
        return skip_add_norm(hidden_states, self.skip_weight, update, next_norm.weight, next_norm.eps,
                             into_main_grad=self.config.gradient_accumulation_fusion)
