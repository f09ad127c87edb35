"""megatron checkpoint -> Hugging Face export: the HF model computes the megatron model's logits (fp32), for a
checkpoint saved at TP=2/PP=2 and at TP=1, for every architecture; the way back is bitwise; errors are one line.

The megatron side runs on gloo ranks (tests/distributed.py). Its weights are perturbed away from their init with
noise seeded by parameter name (identical on every TP rank for replicated tensors), so that skip weights, norms,
A_log, D, dt_bias and the conv are all != their init values and a wrong mapping cannot hide.
Tolerance: |logits_hf - logits_megatron| <= 2e-5 (logits of size ~1; the two differ only in summation order of the
split projections and, at TP=2, of the tensor-parallel reductions).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hf_cases import SMALL, TOKENIZER
from distributed import run_distributed

SEQ, BATCH, ATOL = 40, 2, 2e-5


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _model_cfg(arch: str, **overrides):
    from transxssm_megatron.config import ModelConfig

    return ModelConfig.from_preset("tiny", architecture=arch,
                                   **{**SMALL, "vocab_size": 256, "max_seq_length": 64, **overrides})


# ---------------------------------------------------------------------------------------------- in-rank helpers
def _global_name(model, name: str) -> str:
    """decoder.layers.<local>.x -> decoder.layers.<global>.x (a pipeline stage holds a slice of the layers); the
    last stage's copy of the tied embedding is the embedding (both must get the same noise)."""
    if name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _perturb(model, unit_skips: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = _global_name(model, name)
            seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            if key.endswith("skip_weight") and unit_skips:
                continue
            scale = 0.2 if key.endswith(("skip_weight", "norm.weight", "A_log", "D", "dt_bias")) else 0.01
            p.add_(noise.to(p.dtype) * scale)


def _megatron_logits(model, tokens) -> torch.Tensor | None:
    """Full-vocabulary logits (b, l, V) of this rank's pipeline through megatron's forward-only schedule; the
    tensor on the last stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def step(data_iterator, chunk):
        output = chunk(next(data_iterator), None, runtime_gather_output=True)

        def loss_func(logits):
            captured.append(logits.detach().clone())
            return logits.float().sum() * 0.0, {}

        return output, loss_func

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                                    num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                    forward_only=True)
    return captured[0] if captured else None


def _save_and_forward(run_dir: str, arch: str, unit_skips: bool, overrides: dict | None = None):
    """Build the model at the current layout, perturb, save into run_dir/checkpoints, return its logits."""
    from megatron.core import parallel_state as ps

    from transxssm_megatron.model.builder import build_model, build_transformer_config
    from transxssm_megatron.training.checkpointing import CheckpointManager

    cfg = _model_cfg(arch, **(overrides or {}))
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tconfig = build_transformer_config(cfg, tp=tp, pp=pp, use_cpu_initialization=True, batch_p2p_sync=False)
    model = build_model(cfg, tconfig)
    _perturb(model, unit_skips)
    CheckpointManager(Path(run_dir) / "checkpoints").save(3, [model], None, None, {"step": 3})
    if torch.distributed.get_rank() == 0:
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    logits = _megatron_logits(model, _tokens())
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def _many(root: str, variants: list):
    return {name: _save_and_forward(f"{root}/{name}", arch, unit, extra) for name, arch, unit, extra in variants}


def _load_weights_only(checkpoint: str, arch: str):
    """Load a `convert --to megatron` checkpoint (weights only) at TP=1 and return its logits."""
    from transxssm_megatron.model.builder import build_model, build_transformer_config
    from transxssm_megatron.training.checkpointing import CheckpointManager

    cfg = _model_cfg(arch)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))
    state = CheckpointManager(Path(checkpoint).parent).load(checkpoint, [model], None, None, load_optimizer=False)
    return state, _megatron_logits(model, _tokens())


# ---------------------------------------------------------------------------------------------- HF side
def _hf_logits(folder: Path) -> torch.Tensor:
    """Logits of the export, loaded as a user would: remote code only when the folder ships it."""
    from transformers import AutoModelForCausalLM

    remote = (folder / "modeling_transxssm.py").exists()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).float().eval()
    with torch.no_grad():
        return model(_tokens()).logits


def _export(run_dir: Path, out: Path) -> Path:
    from transxssm_megatron.hf.convert import to_hf

    return to_hf(run_dir / "checkpoints" / "iter_0000003", out, tokenizer=TOKENIZER, progress=False)


def _close(hf: torch.Tensor, megatron: torch.Tensor) -> None:
    assert hf.shape == megatron.shape
    torch.testing.assert_close(hf, megatron.float(), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------- tests
def test_tp2_pp2_checkpoint_exports_with_the_same_logits(tmp_path):
    results = run_distributed(_save_and_forward, 4, str(tmp_path / "run"), "transxssm", False, tp=2, pp=2,
                              timeout_s=240)
    reference = next(r for r in results if r is not None)
    out = _export(tmp_path / "run", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_transxssm.TransXSSMForCausalLM"
    assert "tp=2 pp=2" in (out / "README.md").read_text() and "architecture: transxssm" in (out / "README.md").read_text()
    _close(_hf_logits(out), reference)


def test_tp1_every_architecture_and_the_llama_export(tmp_path):
    variants = [("transxssm", "transxssm", False, {}), ("mamba2", "mamba2", False, {}), ("jamba", "jamba", False, {}),
                ("transformer", "transformer", False, {}), ("llama", "transformer", True, {}),
                # N = P (one RoPE table for both mixers), GQA, and the SS positional mode 'none' with D only
                ("shared_table_gqa", "transxssm", False, {"state_size": 32, "num_query_groups": 1}),
                ("decay_only", "transxssm", False, {"ss_positional": "none", "ss_d_skip": True})]
    reference = run_distributed(_many, 1, str(tmp_path), variants, timeout_s=240)[0]
    for name, *_ in variants:
        out = _export(tmp_path / name, tmp_path / f"{name}_hf")
        remote = (out / "modeling_transxssm.py").exists()
        assert remote == (name != "llama"), name  # trained skip weights != 1: no plain Llama
        _close(_hf_logits(out), reference[name])
    config = json.loads((tmp_path / "llama_hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config


def test_megatron_hf_megatron_round_trip_is_bitwise(tmp_path):
    from transxssm_megatron.hf.convert import to_megatron
    from transxssm_megatron.hf.dist_reader import read_model_tensors

    reference = run_distributed(_save_and_forward, 1, str(tmp_path / "run"), "jamba", False, timeout_s=240)[0]
    out = _export(tmp_path / "run", tmp_path / "hf")
    back = to_megatron(out, tmp_path / "back")
    assert back == tmp_path / "back" / "iter_0000000"
    marker = json.loads((back / "COMPLETE").read_text())
    assert marker["weights_only"] is True and marker["step"] == 0
    original = read_model_tensors(tmp_path / "run" / "checkpoints" / "iter_0000003")
    again = read_model_tensors(back)
    assert sorted(original) == sorted(again)
    for key in original:
        assert original[key].dtype == again[key].dtype and torch.equal(original[key], again[key]), key
    # ...and megatron loads it (weights only, fresh optimizer) into the same model.
    state, logits = run_distributed(_load_weights_only, 1, str(back), "jamba", timeout_s=240)[0]
    assert state["step"] == 0
    assert torch.equal(logits, reference)


def test_conversion_errors_are_one_line(tmp_path):
    from transxssm_megatron.hf.convert import ConversionError, to_hf, to_megatron

    run_distributed(_save_and_forward, 1, str(tmp_path / "run"), "transxssm", False, timeout_s=240)
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_0000003"

    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="taken: already exists"):
        to_hf(checkpoint, tmp_path / "taken", tokenizer=TOKENIZER)

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": _model_cfg("mamba2").to_dict()}))
    with pytest.raises(ConversionError) as err:
        to_hf(checkpoint, tmp_path / "x", config=other, tokenizer=TOKENIZER)
    message = str(err.value)
    assert "\n" not in message and "does not match the run config" in message and "--config" in message
    assert "look like transxssm" in message

    incomplete = tmp_path / "incomplete" / "iter_0000003"
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "COMPLETE").unlink()
    with pytest.raises(ConversionError, match="no COMPLETE marker") as err:
        to_hf(incomplete, tmp_path / "y", config=tmp_path / "run" / "config.yaml", tokenizer=TOKENIZER)
    assert str(incomplete) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    with pytest.raises(ConversionError, match="no config.json"):
        to_megatron(tmp_path / "run", tmp_path / "z")
