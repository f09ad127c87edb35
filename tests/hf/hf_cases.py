"""Shared by the Hugging Face tests: paths, the small model they use, and random-initialised export folders.

`make_export(arch, out)` writes an export folder (the exact layout `transxssm convert --to hf` writes, with the
repository's GPT-NeoX tokenizer) of a small random-initialised model, without megatron: for the generation,
evaluation and NIAH tests, whose subject is the HF side. The megatron <-> HF equality tests build real megatron
checkpoints (test_convert.py).
"""

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"
EVAL_ASSETS = REPO / ".assets" / "eval"

# Small enough for a 2-core CI, every code path of the tiny preset: 2 heads of P = 32, N = 16 (its own RoPE
# table: N != P), 8 layers with the hybrid pattern (attention at layer 7), chunk 16 so that prompts span chunks.
SMALL = dict(hidden_size=64, ffn_hidden_size=128, state_size=16, ss_chunk_size=16, max_seq_length=512)


def small_model_config(arch: str = "transxssm", **overrides):
    from transxssm_megatron.config import ModelConfig

    return ModelConfig.from_preset("tiny", architecture=arch, **{**SMALL, **overrides})


def make_export(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random-initialised export of the SMALL model (real vocabulary, so the real tokenizer fits)."""
    from transxssm_megatron.hf import names
    from transxssm_megatron.hf.configuration_transxssm import TransXSSMConfig
    from transxssm_megatron.hf.convert import write_export
    from transxssm_megatron.hf.modeling_transxssm import TransXSSMForCausalLM

    cfg = small_model_config(arch, **overrides)
    torch.manual_seed(seed)
    model = TransXSSMForCausalLM(TransXSSMConfig(**names.transxssm_config_dict(cfg, torch.float32, {})))
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_export(out, tensors, lambda tokens: names.transxssm_config_dict(cfg, torch.float32, tokens),
                        TOKENIZER, cfg.max_seq_length, remote_code=True, readme="# test export\n")
