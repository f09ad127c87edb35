"""Megatron <-> Hugging Face: parameter names (one explicit table), tensor splits, shapes and configs.

Megatron's HybridStack numbers sub-layers: decoder layer i is `decoder.layers.{2i}` (its mixer, SS or SA) and
`decoder.layers.{2i+1}` (its SwiGLU). The tables below map every global megatron name (as saved by
dist_checkpointing: full, TP/PP-independent tensors) to the Hugging Face name(s). A row with two or three HF names
splits one megatron tensor along dim 0 and the reverse direction concatenates, so a round trip is bitwise:

    linear_qkv  rows per KV group [q (heads/groups x D) | k (D) | v (D)]  ->  q_proj, k_proj, v_proj
    linear_fc1  rows [gate (I) | up (I)]                                  ->  gate_proj, up_proj

`TRANSXSSM_TABLE` is for the trust_remote_code model (modeling_transxssm.py; every architecture), `LLAMA_TABLE` for
a `transformer` exported as a plain LlamaForCausalLM, which has no skip weights: that export needs them all to be
exactly 1 (`llama_compatible`). Pure functions on dicts of tensors; no torch.distributed, no megatron.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from transxssm_megatron.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint or export cannot be converted; the message (one line) names the path or tensor and the fix."""


@dataclass(frozen=True)
class Row:
    megatron: str              # pattern: {mix} = 2i (mixer sub-layer), {ffn} = 2i + 1 (SwiGLU sub-layer)
    hf: tuple[str, ...]        # pattern(s): {i} = decoder layer
    split: str | None = None   # None | "qkv" | "halves"


_SS = [("in_proj.weight", "in_proj.weight"), ("dt_proj.weight", "dt_proj.weight"),
       ("out_proj.weight", "out_proj.weight"), ("A_log", "A_log"), ("D", "D"), ("dt_bias", "dt_bias"),
       ("conv1d_weight", "conv1d.weight"), ("conv1d_bias", "conv1d.bias"), ("gate_norm_weight", "norm.weight")]

TRANSXSSM_TABLE: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Row("decoder.final_norm.weight", ("model.norm.weight",)),
    Row("decoder.layers.{mix}.norm.weight", ("model.layers.{i}.mixer_norm.weight",)),
    Row("decoder.layers.{mix}.skip_weight", ("model.layers.{i}.mixer_skip",)),
    *(Row(f"decoder.layers.{{mix}}.mixer.{ours}", (f"model.layers.{{i}}.mixer.{theirs}",)) for ours, theirs in _SS),
    Row("decoder.layers.{mix}.mixer.linear_qkv.weight",
        ("model.layers.{i}.mixer.q_proj.weight", "model.layers.{i}.mixer.k_proj.weight",
         "model.layers.{i}.mixer.v_proj.weight"), split="qkv"),
    Row("decoder.layers.{mix}.mixer.linear_proj.weight", ("model.layers.{i}.mixer.o_proj.weight",)),
    Row("decoder.layers.{ffn}.norm.weight", ("model.layers.{i}.mlp_norm.weight",)),
    Row("decoder.layers.{ffn}.skip_weight", ("model.layers.{i}.mlp_skip",)),
    Row("decoder.layers.{ffn}.mixer.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), split="halves"),
    Row("decoder.layers.{ffn}.mixer.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)

LLAMA_TABLE: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Row("decoder.final_norm.weight", ("model.norm.weight",)),
    Row("decoder.layers.{mix}.norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    Row("decoder.layers.{mix}.mixer.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"), split="qkv"),
    Row("decoder.layers.{mix}.mixer.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    Row("decoder.layers.{ffn}.norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    Row("decoder.layers.{ffn}.mixer.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), split="halves"),
    Row("decoder.layers.{ffn}.mixer.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)
SKIP_WEIGHT = re.compile(r"^decoder\.layers\.\d+\.skip_weight$")


# ------------------------------------------------------------------------------------------------ shapes
def megatron_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a full (TP=1, PP=1) checkpoint of `cfg` holds, with its shape (model weights only)."""
    d, H, P, N, G = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.state_size, cfg.ss_groups
    x_width = (H // G) * P
    group_width = (x_width if cfg.ss_z_gate else 0) + x_width + 2 * N
    shapes = {"embedding.word_embeddings.weight": (cfg.padded_vocab_size, d), "decoder.final_norm.weight": (d,)}
    for i, kind in enumerate(cfg.layer_kinds()):
        mix, ffn = f"decoder.layers.{2 * i}", f"decoder.layers.{2 * i + 1}"
        for sub in (mix, ffn):
            shapes[f"{sub}.norm.weight"] = (d,)
            if cfg.residual_weights:
                shapes[f"{sub}.skip_weight"] = (d,)
        if kind == "ss":
            shapes.update({f"{mix}.mixer.in_proj.weight": (G * group_width, d), f"{mix}.mixer.dt_proj.weight": (H, d),
                           f"{mix}.mixer.out_proj.weight": (d, H * P), f"{mix}.mixer.A_log": (H,)})
            if cfg.ss_dt_bias:
                shapes[f"{mix}.mixer.dt_bias"] = (H,)
            if cfg.ss_d_skip:
                shapes[f"{mix}.mixer.D"] = (H,)
            if cfg.ss_conv1d:
                shapes[f"{mix}.mixer.conv1d_weight"] = (G * (x_width + 2 * N), 1, cfg.ss_conv_width)
                shapes[f"{mix}.mixer.conv1d_bias"] = (G * (x_width + 2 * N),)
            if cfg.ss_z_gate:
                shapes[f"{mix}.mixer.gate_norm_weight"] = (H * P,)
        else:
            shapes[f"{mix}.mixer.linear_qkv.weight"] = ((H + 2 * cfg.num_query_groups) * P, d)
            shapes[f"{mix}.mixer.linear_proj.weight"] = (d, H * P)
        shapes[f"{ffn}.mixer.linear_fc1.weight"] = (2 * cfg.ffn_hidden_size, d)
        shapes[f"{ffn}.mixer.linear_fc2.weight"] = (d, cfg.ffn_hidden_size)
    return shapes


def _guess_architecture(names: Iterable[str]) -> str:
    names = list(names)
    has = lambda part: any(part in n for n in names)
    if not has(".in_proj."):
        return "transformer"
    kinds = "mamba2 or jamba" if has("conv1d_weight") else "transxssm"
    return kinds if has("linear_qkv") else ("mamba2" if has("conv1d_weight") else "an SS-only model")


def check_megatron_tensors(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """ConversionError (one line) unless `tensors` are exactly those of a `cfg` model, shapes included."""
    expected = megatron_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        guess = _guess_architecture(tensors)
        what = (f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which this model has no place for")
        raise ConversionError(
            f"{source}: the checkpoint does not match the run config (architecture {cfg.architecture!r}, "
            f"{cfg.num_layers} layers): it {what} ({len(missing)} missing, {len(extra)} unexpected tensors; its "
            f"names look like {guess}). Pass the config of the run that wrote it with --config RUN_DIR/config.yaml")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ConversionError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the run config gives "
                                  f"{shape} (another model size?). Pass the run's config with --config")


# ------------------------------------------------------------------------------------------------ names
def _row_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{mix\}", r"(?P<mix>\d+)")
                      .replace(r"\{ffn\}", r"(?P<ffn>\d+)").replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
    return heads_per_group * cfg.head_dim, cfg.head_dim, cfg.head_dim


def _split(row: Row, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    if row.split is None:
        return [t]
    if row.split == "halves":
        return list(t.chunk(2, dim=0))
    groups = t.view(cfg.num_query_groups, -1, t.shape[-1]).split(_qkv_sizes(cfg), dim=1)
    return [g.reshape(-1, t.shape[-1]) for g in groups]


def _merge(row: Row, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if row.split is None:
        return parts[0]
    if row.split == "halves":
        return torch.cat(parts, dim=0)
    g = cfg.num_query_groups
    return torch.cat([p.view(g, -1, p.shape[-1]) for p in parts], dim=1).reshape(-1, parts[0].shape[-1])


def megatron_to_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                   table: tuple[Row, ...] = TRANSXSSM_TABLE) -> dict[str, torch.Tensor]:
    """HF state dict (contiguous tensors, lm_head tied: not included) from full megatron tensors."""
    rules = [(row, _row_regex(row.megatron)) for row in table]
    out = {}
    for name, tensor in tensors.items():
        if table is LLAMA_TABLE and SKIP_WEIGHT.match(name):
            continue  # all ones (llama_compatible checked it): Llama's plain residual
        for row, regex in rules:
            match = regex.match(name)
            if match is None:
                continue
            found = match.groupdict()
            sub = int(found.get("mix") or found.get("ffn") or 0)
            if ("mix" in found and sub % 2) or ("ffn" in found and not sub % 2):
                continue  # the other sub-layer of the pair: mixer sub-layers are even, SwiGLU ones odd
            for hf_name, part in zip(row.hf, _split(row, tensor, cfg)):
                out[hf_name.format(i=sub // 2)] = part.contiguous()
            break
        else:
            raise ConversionError(f"{name}: no Hugging Face name for this megatron tensor (add a row to "
                                  f"transxssm_megatron/hf/names.py)")
    return out


def hf_to_megatron(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                   table: tuple[Row, ...] = TRANSXSSM_TABLE) -> dict[str, torch.Tensor]:
    """Full megatron tensors from an HF state dict (the inverse of megatron_to_hf; `lm_head.weight` is dropped as
    the tied copy of the embedding, Llama exports get skip weights of 1)."""
    parts: dict[tuple[Row, int], dict[int, torch.Tensor]] = {}
    rules = [(row, j, _row_regex(pattern)) for row in table for j, pattern in enumerate(row.hf)]
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            continue
        for row, j, regex in rules:
            match = regex.match(name)
            if match is not None:
                layer = int(match.group("i")) if "i" in regex.groupindex else 0
                parts.setdefault((row, layer), {})[j] = tensor
                break
        else:
            raise ConversionError(f"{name}: not a TransXSSM tensor name (names.py lists the known ones)")
    out = {}
    for (row, layer), pieces in parts.items():
        if len(pieces) != len(row.hf):
            lacking = row.hf[min(set(range(len(row.hf))) - set(pieces))].format(i=layer)
            raise ConversionError(f"{lacking}: missing from the export (its sibling tensors are there)")
        name = row.megatron.format(mix=2 * layer, ffn=2 * layer + 1)
        out[name] = _merge(row, [pieces[j] for j in range(len(row.hf))], cfg).contiguous()
    if table is LLAMA_TABLE and cfg.residual_weights:
        dtype = out["decoder.final_norm.weight"].dtype
        for j in range(2 * cfg.num_layers):
            out[f"decoder.layers.{j}.skip_weight"] = torch.ones(cfg.hidden_size, dtype=dtype)
    return out


def llama_compatible(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> tuple[bool, str]:
    """Whether a plain LlamaForCausalLM computes exactly this model, and why not.

    Llama's residual is h + f(RMSNorm(h)). Ours is w * h + f(RMSNorm(h)). A per-channel w cannot be folded into
    other weights: rescaling the residual stream by s (h = s * g) would need RMSNorm(s * g) = s' * RMSNorm(g),
    which holds only for a scalar s, and the norm weights cannot absorb the rms of s * g. So only w == 1 exports
    as Llama."""
    if cfg.architecture != "transformer":
        return False, f"architecture {cfg.architecture!r} has SS layers"
    not_one = [n for n, t in tensors.items() if SKIP_WEIGHT.match(n) and not bool((t == 1).all())]
    if not_one:
        return False, (f"{len(not_one)} skip weights (e.g. {not_one[0]}) differ from 1, which Llama's plain "
                       f"residual cannot represent")
    return True, "every skip weight is 1"


# ------------------------------------------------------------------------------------------------ configs
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def transxssm_config_dict(cfg: ModelConfig, dtype: torch.dtype, tokens: Mapping[str, int]) -> dict:
    """config.json of the remote-code model (auto_map points at the two files copied next to it)."""
    return {
        "architectures": ["TransXSSMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_transxssm.TransXSSMConfig",
                     "AutoModelForCausalLM": "modeling_transxssm.TransXSSMForCausalLM"},
        "model_type": "transxssm",
        "architecture": cfg.architecture,
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "intermediate_size": cfg.ffn_hidden_size,
        "state_size": cfg.state_size,
        "ss_groups": cfg.ss_groups,
        "mixer_types": cfg.layer_kinds(),
        "ss_positional": cfg.ss_positional,
        "ss_conv1d": cfg.ss_conv1d,
        "ss_conv_width": cfg.ss_conv_width,
        "ss_d_skip": cfg.ss_d_skip,
        "ss_z_gate": cfg.ss_z_gate,
        "ss_dt_bias": cfg.ss_dt_bias,
        "ss_chunk_size": cfg.ss_chunk_size,
        "residual_weights": cfg.residual_weights,
        "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_length,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        "megatron_config": cfg.to_dict(),
        **tokens,
    }


def llama_config_dict(cfg: ModelConfig, dtype: torch.dtype, tokens: Mapping[str, int]) -> dict:
    """config.json of a plain Llama (no remote code). rope_theta is written in both the transformers 4.x field and
    the 5.x `rope_parameters`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_length,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
        "megatron_config": cfg.to_dict(),
        **tokens,
    }


def model_config_from_hf(config: Mapping) -> ModelConfig:
    """The training ModelConfig an export was made from (its `megatron_config`)."""
    saved = config.get("megatron_config")
    if not isinstance(saved, Mapping):
        raise ConversionError("config.json has no megatron_config: this folder was not written by "
                              "`transxssm convert --to hf`, so its megatron layout is unknown")
    return ModelConfig.from_dict(saved)
