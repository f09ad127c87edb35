"""From a ModelConfig to megatron-core objects: the TransformerConfig and the TransXSSM HybridModel.

    tc = build_transformer_config(model_cfg, tp=2, pp=1, bf16=True, params_dtype=torch.bfloat16)
    model = build_model(model_cfg, tc)                # stage flags from parallel_state when not given
    loss = model(input_ids, position_ids, labels=labels)   # (b, l) fp32 per-token loss; logits (b, l, V/tp) w/o labels

`TransXSSMModel` is megatron's HybridModel (embedding, tied LM head, pipeline-segment selection, checkpoint
sharding all inherited) with our decoder stack spec and a short forward of its own that computes the Unified
RoPE tables once per call and hands them to the stack (stack.py), which passes them to every layer.

With context parallelism (cp > 1) every input (input_ids, labels, loss_mask, position_ids) is this CP rank's
contiguous block of l/cp positions; the RoPE tables are built for the whole sequence (positions 0..l-1, or the
CP-gathered position_ids), since the mixers rotate only after their all-to-all to the full sequence
(context_parallel.py). The losses returned are those of this rank's tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import init_method_normal

from ..config import ModelConfig
from .context_parallel import cp_group_of, gather_sequence
from .embedding import embed_into_main_grad, reproduces_megatron
from .fused_ops import fusion_enabled
from .lm_loss import linear_cross_entropy
from .rope import UnifiedRope
from .specs import hybrid_layer_pattern, transxssm_stack_spec


def build_transformer_config(model_cfg: ModelConfig, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                             cp: int = 1, params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                             sequence_parallel: bool = False, **megatron_overrides) -> TransformerConfig:
    """Megatron's TransformerConfig for `model_cfg` on a (tp, pp[, vpp], cp) layout; validates model_cfg first.

    `num_layers` counts HybridStack sub-layers (2 per decoder layer). Init is N(0, init_std) everywhere; with
    `depth_scaled_init` the output projections use init_std / sqrt(2 * decoder layers) (Megatron's scaling).
    Keyword overrides go straight to TransformerConfig (e.g. batch_p2p_sync=False for gloo pipelines,
    recompute_granularity="full")."""
    model_cfg.validate(tp=tp, pp=pp, vpp=vpp, cp=cp)
    std = model_cfg.init_std
    out_std = std / math.sqrt(2 * model_cfg.num_layers) if model_cfg.depth_scaled_init else std
    kwargs = dict(
        num_layers=2 * model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        is_hybrid_model=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel and tp > 1,  # meaningless without TP (megatron would refuse it)
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        init_method_std=std,
        init_method=init_method_normal(std),
        output_layer_init_method=init_method_normal(out_std),
        use_cpu_initialization=not torch.cuda.is_available(),
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    kwargs.update(megatron_overrides)
    return TransformerConfig(**kwargs)


class TransXSSMModel(HybridModel):
    """TransXSSM (or a baseline of docs/model.md §8) as a megatron HybridModel; one pipeline stage of it when pp > 1."""

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, *, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None, pg_collection=None):
        stages = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
        super().__init__(
            config,
            transxssm_stack_spec(model_cfg),
            vocab_size=model_cfg.padded_vocab_size,
            max_sequence_length=model_cfg.max_seq_length,
            hybrid_layer_pattern=hybrid_layer_pattern(model_cfg, stages),
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=True,
            position_embedding_type="none",  # positions enter through Unified RoPE only
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        self.model_cfg = model_cfg
        # With PP = 1 megatron marks the one weight that the embedding and the LM head share `zero_out_wgrad`
        # (LanguageModule.setup_embeddings_and_output_layer): its hook then adds whatever gradient arrives, the
        # lookup's dense one. `_embed` clears the mark for the steps whose lookup adds into main_grad itself.
        self._tied_on_this_stage = pre_process and bool(getattr(self._output_weight(), "zero_out_wgrad", False))
        self.rope = UnifiedRope(model_cfg.head_dim, model_cfg.state_size if model_cfg.ss_uses_rope else None,
                                model_cfg.rope_base)

    def _sequence_length(self, input_ids, decoder_input, cp: int) -> tuple[int, torch.device]:
        """The whole sequence's length (over CP ranks) and the device."""
        if input_ids is not None:
            return input_ids.shape[1] * cp, input_ids.device
        hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
        local = hidden.shape[0]  # (l, b, d), sequence-parallel shards hold l / (cp * tp) positions
        tp = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        return local * tp * cp, hidden.device

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, decoder_input: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inference_context=None,
                runtime_gather_output: Optional[bool] = None, loss_mask: Optional[torch.Tensor] = None,
                **unused) -> torch.Tensor:
        """input_ids, position_ids, labels, loss_mask (b, l). Attention is always causal: attention_mask is ignored.

        Returns, on the last pipeline stage: with labels and loss_mask, the masked loss sum (fp32 scalar; the
        training path, see `masked_loss_sum`); with labels only, the per-token loss (b, l) fp32; else logits
        (b, l, padded_vocab / tp) (all of the vocabulary with runtime_gather_output=True). On other stages the
        hidden states (l, b, d). position_ids None means 0..l-1 for every row. With context parallelism all of these
        are this CP rank's block of the sequence (l = l_total / cp), and so is the returned loss or logits."""
        if decoder_input is None and self.pre_process:
            decoder_input = self._embed(input_ids)                                # (l, b, d)
        cp_group = cp_group_of(self.pg_collection)
        cp = cp_group.size() if cp_group is not None else 1
        if position_ids is not None:
            position_ids = gather_sequence(position_ids, cp_group, dim=1)          # (b, l_total)
            seq_len, device = position_ids.shape[1], position_ids.device
        else:
            seq_len, device = self._sequence_length(input_ids, decoder_input, cp)
        rope = self.rope(position_ids, seq_len, device)                            # for the whole sequence
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rope)
        if not self.post_process:
            return hidden
        if labels is not None:
            if loss_mask is not None:
                return self.masked_loss_sum(hidden, labels, loss_mask)
            return self.per_token_loss(hidden, labels)
        logits, _ = self.output_layer(hidden, weight=self._output_weight(),
                                      runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """megatron's embedding: (b, l) -> (l, b, d), (l / tp, b, d) with sequence parallelism. With fusion on and
        the weight gradients added into main_grad by the layers themselves, the same lookup adding its gradient
        there too (embedding.py)."""
        emb, config = self.embedding, self.config
        weight = emb.word_embeddings.weight
        main_grad = getattr(weight, "main_grad", None) if config.gradient_accumulation_fusion else None
        fast = main_grad is not None and fusion_enabled() and torch.is_grad_enabled() and reproduces_megatron(emb)
        if self._tied_on_this_stage:
            # Both users add into main_grad: the hook must add neither's stand-in. The LM head hands it one (marked
            # as added, so the hook still runs once), the lookup nothing.
            weight.zero_out_wgrad = not fast
        if not fast:
            return emb(input_ids=input_ids, position_ids=None)
        return embed_into_main_grad(emb, input_ids, main_grad, give_grad=not self._tied_on_this_stage)

    def _output_weight(self) -> Optional[torch.Tensor]:
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    def per_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """megatron's output layer + vocab-parallel cross-entropy: per-token loss (b, l) fp32 (the reference)."""
        logits, _ = self.output_layer(hidden, weight=self._output_weight())
        return self.compute_language_model_loss(labels, logits)

    def masked_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """sum over tokens of loss_mask * cross-entropy; hidden (l, b, d) final-norm output, labels/mask (b, l).

        With fusion on (the default) the LM head and the cross-entropy run chunked (lm_loss.py: no full logits,
        compiled on CUDA); with fusion off, megatron's output layer and vocab-parallel cross-entropy, the reference."""
        if not fusion_enabled():
            return (self.per_token_loss(hidden, labels) * loss_mask).sum()
        tp_group = self.output_layer.tp_group
        if self.config.sequence_parallel:   # the LM head sees every position: gather, reduce-scatter in backward
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=tp_group)
        else:                               # replicated input: all-reduce its gradient over TP in backward
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
        weight = self._output_weight()
        weight = self.output_layer.weight if weight is None else weight
        flat = lambda t: t.transpose(0, 1).reshape(-1)                              # (b, l) -> l-major, as hidden
        # Where the linear layers add weight gradients into main_grad themselves, the LM head does too.
        main_grad = getattr(weight, "main_grad", None) if self.config.gradient_accumulation_fusion else None
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat(labels),
                                    flat(loss_mask), tp_group if tp_group.size() > 1 else None, main_grad=main_grad)


def build_model(model_cfg: ModelConfig, transformer_config: TransformerConfig, *,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None) -> TransXSSMModel:
    """Build this rank's model (stage). pre_process / post_process default to whether this rank holds the
    first / last pipeline stage (megatron's parallel_state must be initialised)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return TransXSSMModel(transformer_config, model_cfg, pre_process=pre_process, post_process=post_process,
                          vp_stage=vp_stage)
