"""`TransXSSMConfig`: the Hugging Face configuration of TransXSSM and its baselines (trust_remote_code file).

Self-contained on purpose: an export folder holds this file and modeling_transxssm.py, and `AutoConfig` /
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` load them with only torch and transformers
installed. The fields mirror `transxssm_megatron.config.ModelConfig` (SPEC.md §2-§6) under Hugging Face names:

    hidden_size d, num_hidden_layers, num_attention_heads H (= SS heads), num_key_value_heads (GQA),
    intermediate_size I (SwiGLU), state_size N, ss_groups G, mixer_types ("ss" | "sa" per layer),
    ss_positional (rope | conv1d_d | none), ss_conv1d, ss_conv_width, ss_d_skip, ss_z_gate, ss_dt_bias,
    ss_chunk_size, residual_weights (learnable skip weights w: h = w * h + f(RMSNorm(h))), rope_theta,
    rms_norm_eps, vocab_size (the padded embedding rows), max_position_embeddings.

`architecture` names the network family (transxssm | mamba2 | jamba | transformer): all four run through the same
modeling code. `megatron_config` keeps the training run's ModelConfig as a plain dict so that an export converts
back to a megatron checkpoint exactly (`transxssm convert --to megatron`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

ARCHITECTURES = ("transxssm", "mamba2", "jamba", "transformer")


class TransXSSMConfig(PretrainedConfig):
    model_type = "transxssm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, architecture: str = "transxssm", vocab_size: int = 50304, hidden_size: int = 128,
                 num_hidden_layers: int = 8, num_attention_heads: int = 2, num_key_value_heads: int | None = None,
                 intermediate_size: int = 384, state_size: int = 64, ss_groups: int | None = None,
                 mixer_types: list[str] | None = None, ss_positional: str = "rope", ss_conv1d: bool = False,
                 ss_conv_width: int = 4, ss_d_skip: bool = False, ss_z_gate: bool = False, ss_dt_bias: bool = False,
                 ss_chunk_size: int = 256, residual_weights: bool = True, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-6, max_position_embeddings: int = 2048, initializer_range: float = 0.02,
                 megatron_config: dict | None = None, use_cache: bool = True, tie_word_embeddings: bool = True,
                 bos_token_id: int = 0, eos_token_id: int = 0, pad_token_id: int = 1, **kwargs):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: unknown value {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.state_size = state_size
        self.ss_groups = ss_groups or num_attention_heads
        self.mixer_types = list(mixer_types) if mixer_types is not None else default_mixer_types(
            architecture, num_hidden_layers)
        if len(self.mixer_types) != num_hidden_layers or set(self.mixer_types) - {"ss", "sa"}:
            raise ValueError(f"mixer_types: expected {num_hidden_layers} entries of 'ss' / 'sa', got "
                             f"{self.mixer_types}")
        self.ss_positional = ss_positional
        self.ss_conv1d = ss_conv1d
        self.ss_conv_width = ss_conv_width
        self.ss_d_skip = ss_d_skip
        self.ss_z_gate = ss_z_gate
        self.ss_dt_bias = ss_dt_bias
        self.ss_chunk_size = ss_chunk_size
        self.residual_weights = residual_weights
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.megatron_config = megatron_config
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        """P = d / H: the attention head dim and the SS head dim."""
        return self.hidden_size // self.num_attention_heads


def default_mixer_types(architecture: str, num_layers: int, period: int = 8, offset: int = 7) -> list[str]:
    """SPEC §4 / §8: all attention (transformer), all SS (mamba2), else attention at `offset` of every `period`."""
    if architecture == "transformer":
        return ["sa"] * num_layers
    if architecture == "mamba2":
        return ["ss"] * num_layers
    return ["sa" if i % period == offset else "ss" for i in range(num_layers)]
