"""The model as data: megatron ModuleSpecs for our layers and the hybrid layer pattern (docs/model.md §4, §8).

HybridStack symbols: `M` = our SS mixer sub-layer, `*` = our attention sub-layer, `-` = SwiGLU FFN sub-layer,
`|` = pipeline stage boundary. A decoder layer is a mixer sub-layer followed by an FFN sub-layer, so the 24-layer
TransXSSM is `("M-"*7 + "*-") * 3` (48 HybridStack layers); `transformer` is all `*-`, `mamba2` all `M-`,
`jamba` the TransXSSM pattern with Mamba-2 style SS options.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import ModelConfig
from .layers import ResidualLayer, ResidualLayerSubmodules, SwiGLU
from .sa_mixer import SelfAttentionMixer
from .ss_mixer import SSMixer
from .stack import TransXSSMStack

_SYMBOL = {"ss": "M", "sa": "*"}


def hybrid_layer_pattern(model_cfg: ModelConfig, pipeline_stages: int = 1) -> str:
    """HybridStack pattern of the whole model, with `|` between `pipeline_stages` equal stages.

    pipeline_stages = pp * vpp (virtual stages are interleaved by megatron: segment i goes to rank i % pp)."""
    if model_cfg.num_layers % pipeline_stages:
        raise ValueError(f"num_layers {model_cfg.num_layers} is not divisible by {pipeline_stages} pipeline stages")
    layers = [_SYMBOL[kind] + "-" for kind in model_cfg.layer_kinds()]
    per_stage = model_cfg.num_layers // pipeline_stages
    return "|".join("".join(layers[i:i + per_stage]) for i in range(0, len(layers), per_stage))


def transxssm_stack_spec(model_cfg: ModelConfig) -> ModuleSpec:
    """ModuleSpec of the decoder stack; every layer receives `model_cfg` through the spec params."""
    def layer(mixer: ModuleSpec) -> ModuleSpec:
        return ModuleSpec(module=ResidualLayer, params={"model_cfg": model_cfg},
                          submodules=ResidualLayerSubmodules(mixer=mixer))

    swiglu = ModuleSpec(module=SwiGLU, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=TransXSSMStack,
        params={"model_cfg": model_cfg},
        submodules=HybridStackSubmodules(
            mamba_layer=layer(ModuleSpec(module=SSMixer)),
            attention_layer=layer(ModuleSpec(module=SelfAttentionMixer)),
            mlp_layer=layer(swiglu),
        ),
    )
