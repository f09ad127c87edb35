"""`TransXSSMStack`: megatron's HybridStack with a torch-native final RMSNorm and Unified RoPE for every layer.

Two changes to HybridStack, made here once:
1. HybridStack hard-codes its final norm to Transformer Engine's `TENorm` (hybrid_block.py), which neither our CPU
   CI nor the GPU machine has. We build the parent without it (`post_layer_norm=False`) and add our RMSNorm.
2. HybridStack only hands `rotary_pos_emb` to TransformerLayer instances. Ours passes the model's RopeTables
   (in that same argument) to every layer, SS and SA alike. The loop is also much shorter than the parent's
   since we use none of fp8/fp4, CUDA graphs or inference contexts.
3. Each sub-layer's residual add and the next sub-layer's pre-norm (or the final norm) run as one fused
   function (`fused_ops.skip_add_norm`), so the loop carries both h and RMSNorm(h) from layer to layer.
Layer construction, pipeline-segment bookkeeping, `set_input_tensor` and `sharded_state_dict` are HybridStack's.

Activation recomputation: with `recompute_granularity == "full"` each sub-layer is recomputed in backward
(torch.utils.checkpoint, non-reentrant; CPU and GPU alike): every one with `recompute_method == "uniform"`, the first
`recompute_num_layers` sub-layers of this stack (one pipeline or virtual stage) with "block", as megatron's
TransformerBlock does.
"""

from __future__ import annotations

import torch
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from .norms import RMSNorm, param_device
from .rope import RopeTables


class TransXSSMStack(HybridStack):
    def __init__(self, config, submodules, *args, model_cfg=None, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            eps = model_cfg.norm_eps if model_cfg is not None else config.layernorm_epsilon
            self.final_norm = RMSNorm(config.hidden_size, eps=eps, sequence_parallel=config.sequence_parallel,
                                      dtype=config.params_dtype, device=param_device(config))

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                rotary_pos_emb: RopeTables | None = None, **unused):
        """hidden_states (l, b, d) (ignored on non-first pipeline stages: set_input_tensor's tensor is used)."""
        if not self.pre_process:
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        c = self.config
        recompute = c.recompute_granularity == "full" and self.training
        recomputed = len(self.layers) if c.recompute_method != "block" else c.recompute_num_layers
        last = self.final_norm if self.post_process and self.post_layer_norm else None
        next_norms = [layer.norm for layer in self.layers[1:]] + [last]
        normed = self.layers[0].norm(hidden_states)
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            if recompute and i < recomputed:
                hidden_states, normed = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, normed, rotary_pos_emb, next_norm, use_reentrant=False)
            else:
                hidden_states, normed = layer(hidden_states, normed, rotary_pos_emb, next_norm)
        if last is not None:
            hidden_states = normed
        # Pipeline stages exchange this tensor: it must not be a view (see megatron's TransformerBlock).
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
