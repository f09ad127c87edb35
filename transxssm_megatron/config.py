"""Model configuration: one small, validated dataclass (docs/model.md §2-§6, §8).

`ModelConfig` describes the network only (no parallelism, no optimizer). It is built from a preset
(`ModelConfig.from_preset("320m", num_layers=12)`) or a YAML file / mapping (`ModelConfig.from_yaml(path)`),
checked against a parallel layout with `validate(tp, pp, vpp, cp)`, and turned into megatron-core objects by
`transxssm_megatron.model.builder`.

Architecture-dependent SS options default to `None` and are resolved in `__post_init__`:
- `transxssm`: SS positional mode `rope`, no conv1d / D / z-gate / dt_bias (the paper's block).
- `mamba2`, `jamba`: SS positional mode `conv1d_d` with the Mamba-2 options (conv1d, D, z-gate + gated RMSNorm,
  dt_bias), no RoPE on B/C.
- `transformer`: no SS layer at all (the SS options are ignored).
Positional mode `conv1d_d` implies conv1d and D (an explicit `ss_conv1d: false` with it is an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

ARCHITECTURES = ("transxssm", "transformer", "mamba2", "jamba")
SS_POSITIONAL_MODES = ("rope", "conv1d_d", "none")

# docs/model.md §6. FFN sizes are ours; `ffn_hidden_size` is the SwiGLU inner size I.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_layers=8, num_attention_heads=2, state_size=64, ss_groups=2,
                 ffn_hidden_size=384, max_seq_length=256),
    "320m": dict(hidden_size=768, num_layers=24, num_attention_heads=12, state_size=128, ss_groups=12,
                 ffn_hidden_size=3584, max_seq_length=2048),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_attention_heads=32, state_size=128, ss_groups=32,
                 ffn_hidden_size=4096, max_seq_length=2048),
}

# Mamba-2 style SS options used by the `mamba2` and `jamba` baselines (docs/model.md §8).
_MAMBA2_SS_DEFAULTS = dict(ss_positional="conv1d_d", ss_conv1d=True, ss_d_skip=True, ss_z_gate=True,
                           ss_dt_bias=True)
_TRANSXSSM_SS_DEFAULTS = dict(ss_positional="rope", ss_conv1d=False, ss_d_skip=False, ss_z_gate=False,
                              ss_dt_bias=False)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


@dataclass
class ModelConfig:
    """The TransXSSM network (and its baselines). Sizes follow docs/model.md's notation in the comments."""

    architecture: str = "transxssm"      # transxssm | transformer | mamba2 | jamba
    hidden_size: int = 128                # d
    num_layers: int = 8                   # decoder layers, each = mixer + SwiGLU FFN
    num_attention_heads: int = 2          # attention heads = SS heads H; head dim P = d / H
    num_query_groups: Optional[int] = None  # GQA: KV heads of attention (None: = heads, plain MHA)
    ffn_hidden_size: int = 384            # SwiGLU inner size I
    state_size: int = 64                  # N, SSM state size (even when rotated by RoPE)
    ss_groups: Optional[int] = None       # G, number of B/C groups (None: = H, per-head B/C)
    ss_positional: Optional[str] = None   # rope | conv1d_d | none (None: architecture default)
    ss_conv1d: Optional[bool] = None      # causal depthwise conv (width ss_conv_width) + SiLU on x|B|C
    ss_conv_width: int = 4
    ss_d_skip: Optional[bool] = None      # y += D * x
    ss_z_gate: Optional[bool] = None      # y = RMSNorm(y * silu(z)) (gated RMSNorm per B/C group)
    ss_dt_bias: Optional[bool] = None     # delta = softplus(dt + dt_bias), Mamba-2 init
    ss_chunk_size: int = 256              # SSD chunk length
    residual_weights: bool = True         # learnable per-channel skip weights w_mix, w_ffn (off: h + f(h))
    rope_base: float = 10000.0
    vocab_size: int = 50277               # tokenizer size (GPT-NeoX-20B); padded to a multiple of 128
    vocab_multiple: int = 128
    max_seq_length: int = 2048
    init_std: float = 0.02
    depth_scaled_init: bool = False       # Megatron's std / sqrt(2 * num_layers) on output projections
    norm_eps: float = 1e-6
    attention_period: int = 8             # hybrid pattern: one attention layer per `attention_period` layers,
    attention_offset: int = 7             # at this offset inside each period (docs/model.md §4: layers 7, 15, 23)

    # ---------------------------------------------------------------------------------------- construction
    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture: unknown value {self.architecture!r}; choose one of "
                              f"{', '.join(ARCHITECTURES)}")
        defaults = _MAMBA2_SS_DEFAULTS if self.architecture in ("mamba2", "jamba") else _TRANSXSSM_SS_DEFAULTS
        if self.ss_positional is None:
            self.ss_positional = defaults["ss_positional"]
        if self.ss_positional not in SS_POSITIONAL_MODES:
            raise ConfigError(f"ss_positional: unknown value {self.ss_positional!r}; choose one of "
                              f"{', '.join(SS_POSITIONAL_MODES)}")
        if self.ss_positional == "conv1d_d":
            for name in ("ss_conv1d", "ss_d_skip"):
                if getattr(self, name) is False:
                    raise ConfigError(f"{name}: ss_positional 'conv1d_d' means conv1d + D; set {name}: true "
                                      f"or choose another ss_positional")
                setattr(self, name, True)
        for name in ("ss_conv1d", "ss_d_skip", "ss_z_gate", "ss_dt_bias"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.ss_groups is None:
            self.ss_groups = self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        self._check_sizes()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset of docs/model.md §6 (`tiny`, `320m`, `1.3b`) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping; a `preset` key starts from that preset. Unknown keys are rejected by name."""
        values = dict(values)
        preset = values.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown model option (known: {', '.join(sorted(known))})")
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}
        return cls(**values)

    @classmethod
    def from_yaml(cls, source: str | Path | Mapping[str, Any]) -> "ModelConfig":
        """Load from a YAML file (its top level, or its `model:` section) or an already-parsed mapping."""
        if isinstance(source, Mapping):
            data = source
        else:
            import yaml

            with open(source) as f:
                data = yaml.safe_load(f) or {}
            if not isinstance(data, Mapping):
                raise ConfigError(f"{source}: expected a mapping of model options at the top level")
        if "model" in data and isinstance(data["model"], Mapping):
            data = data["model"]
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every (resolved) field; `from_dict(to_dict())` round-trips."""
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        """P = d / H: the SS head dim and the attention head dim (64 in both paper presets)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of `vocab_multiple` (50,277 -> 50,304).

        Independent of the tensor-parallel size so that checkpoints keep one shape; validate() checks that
        the padded size splits evenly over TP ranks."""
        m = self.vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def has_ss_layers(self) -> bool:
        return self.architecture != "transformer"

    @property
    def ss_uses_rope(self) -> bool:
        return self.has_ss_layers and self.ss_positional == "rope"

    def layer_kinds(self) -> list[str]:
        """Mixer of each decoder layer: 'ss' or 'sa'. Period 8 with attention at offset 7 for the hybrids."""
        if self.architecture == "transformer":
            return ["sa"] * self.num_layers
        if self.architecture == "mamba2":
            return ["ss"] * self.num_layers
        return ["sa" if i % self.attention_period == self.attention_offset else "ss"
                for i in range(self.num_layers)]

    # ---------------------------------------------------------------------------------------- validation
    def _check_sizes(self) -> None:
        positive = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "state_size", "ss_groups", "ss_conv_width", "ss_chunk_size", "vocab_size", "vocab_multiple",
                    "max_seq_length", "attention_period")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads} (head dim P = d / H)")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"num_query_groups: {self.num_query_groups} must divide num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.has_ss_layers and self.num_attention_heads % self.ss_groups:
            raise ConfigError(f"ss_groups: G = {self.ss_groups} must divide the number of heads "
                              f"H = {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"num_attention_heads: head dim {self.head_dim} must be even for RoPE")
        if self.ss_uses_rope and self.state_size % 2:
            raise ConfigError(f"state_size: N = {self.state_size} must be even when ss_positional is 'rope' "
                              f"(RoPE rotates pairs of state channels)")
        if not 0 <= self.attention_offset < self.attention_period:
            raise ConfigError(f"attention_offset: {self.attention_offset} must lie in [0, attention_period)")
        for name, low in (("init_std", 0.0), ("norm_eps", 0.0), ("rope_base", 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low:
                raise ConfigError(f"{name}: must be a number > {low:g}, got {value!r}")

    def validate(self, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1) -> "ModelConfig":
        """Check the config against a parallel layout; raises ConfigError naming the field. Returns self.

        Context parallelism (cp) splits the heads and groups that TP leaves on a rank once more, inside each
        mixer (docs/training.md, context parallelism): every count of heads or groups must divide by tp * cp."""
        self._check_sizes()
        if tp < 1 or pp < 1 or cp < 1:
            raise ConfigError(f"tensor/pipeline/context parallel sizes must be >= 1, got tp={tp}, pp={pp}, cp={cp}")
        split = tp * cp
        by = f"tensor parallel size {tp}" if cp == 1 else f"tp * cp = {tp} * {cp}"
        who = "TP splits" if cp == 1 else "TP and CP split"
        if self.num_attention_heads % split:
            raise ConfigError(f"num_attention_heads: {self.num_attention_heads} heads are not divisible by {by} "
                              f"({who} whole heads)")
        if self.num_query_groups % split:
            raise ConfigError(f"num_query_groups: {self.num_query_groups} KV groups are not divisible by {by}")
        if self.has_ss_layers and self.ss_groups % split:
            raise ConfigError(f"ss_groups: G = {self.ss_groups} is not divisible by {by} "
                              f"({who} whole B/C groups)")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"ffn_hidden_size: {self.ffn_hidden_size} is not divisible by tensor parallel "
                              f"size {tp}")
        if self.padded_vocab_size % tp:
            raise ConfigError(f"vocab_multiple: padded vocabulary {self.padded_vocab_size} is not divisible by "
                              f"tensor parallel size {tp}")
        stages = pp * (vpp or 1)
        if self.num_layers % stages:
            raise ConfigError(f"num_layers: {self.num_layers} layers cannot be split evenly over {stages} "
                              f"pipeline stages (pp={pp}, vpp={vpp or 1})")
        return self
