"""`transxssm convert`: megatron dist_checkpointing checkpoint <-> Hugging Face export folder.

    transxssm convert --to hf runs/x/checkpoints/iter_0010000 exports/x       # any TP/PP/DP layout, one CPU process
    transxssm convert --to megatron exports/x runs/y/checkpoints               # -> runs/y/checkpoints/iter_0000000

`--to hf` reads the checkpoint with torch's own DCP reader (dist_reader.py: no GPU, no process group), checks it
against the run's config.yaml (found next to the checkpoints folder, or --config), maps the names (names.py) and
writes into OUT: model.safetensors, config.json (auto_map to the two remote-code files copied beside it),
generation_config.json, tokenizer.json + tokenizer_config.json + special_tokens_map.json, and README.md (a model card
with the run's config). A `transformer` whose skip weights are all 1 is written as a plain LlamaForCausalLM (no
remote code); any other model, including a trained `transformer` (skip weights differ from 1), uses the remote code.

`--to megatron` writes model weights only, as a checkpoint that `transxssm train --resume PATH` loads with a fresh
optimizer and schedule from step 0 (its COMPLETE marker says `weights_only: true`). It runs megatron-core's own save
in a single-process gloo group (TP=1, PP=1); training at any layout reshards it on load.

Both refuse an existing OUT and stop with one line (ConversionError) naming the path and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import yaml

from transxssm_megatron.config import ConfigError, ModelConfig
from transxssm_megatron.hf import names
from transxssm_megatron.hf.names import ConversionError

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_transxssm.py", "modeling_transxssm.py")
TOKENIZER_NAME = "gpt-neox-20b.json"
EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"


# --------------------------------------------------------------------------------------------- locating inputs
def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The run's config.yaml: RUN_DIR/config.yaml for RUN_DIR/checkpoints/iter_X (or beside the checkpoint)."""
    for candidate in (checkpoint.parent.parent / "config.yaml", checkpoint.parent / "config.yaml",
                      checkpoint / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def find_tokenizer(explicit: Optional[str | Path] = None) -> Path:
    """tokenizer.json to ship: --tokenizer, $TRANSXSSM_ASSETS/tokenizer, ./.assets/tokenizer or the repository's."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConversionError(f"--tokenizer {explicit}: no such file; give a tokenizers JSON such as "
                                  f".assets/tokenizer/{TOKENIZER_NAME}")
        return path
    roots = [os.environ.get("TRANSXSSM_ASSETS"), ".assets", str(HERE.parents[1] / ".assets")]
    for root in roots:
        if root and (Path(root) / "tokenizer" / TOKENIZER_NAME).is_file():
            return Path(root) / "tokenizer" / TOKENIZER_NAME
    raise ConversionError(f"no tokenizer found (.assets/tokenizer/{TOKENIZER_NAME}); run `transxssm-preprocess "
                          f"assets --out .assets` or pass --tokenizer PATH")


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out}: already exists; choose a new output folder or remove it first")


def _check_checkpoint(path: Path) -> dict:
    """The COMPLETE marker of an intact checkpoint; ConversionError (one line) otherwise."""
    from transxssm_megatron.training.checkpointing import CheckpointError, inspect_checkpoint, read_marker

    if not path.exists():
        raise ConversionError(f"{path}: no such checkpoint folder")
    try:
        marker = read_marker(path)
    except CheckpointError as err:
        raise ConversionError(f"{err}. Convert a complete checkpoint (transxssm checkpoint list "
                              f"{path.parent})") from None
    status = inspect_checkpoint(path)
    if not status.loadable:
        raise ConversionError(f"{path}: {status.reason}. Convert another checkpoint (transxssm checkpoint list "
                              f"{path.parent})")
    if not (path / ".metadata").is_file():
        raise ConversionError(f"{path}: no .metadata file: not a torch_dist checkpoint of dist_checkpointing")
    return marker


def _model_config(checkpoint: Path, config: Optional[str | Path]) -> tuple[ModelConfig, Optional[Path]]:
    path = Path(config) if config is not None else find_run_config(checkpoint)
    if path is None or not path.is_file():
        where = f"--config {config}: no such file" if config is not None else (
            f"{checkpoint}: no config.yaml of the run found next to it ({checkpoint.parent.parent / 'config.yaml'})")
        raise ConversionError(f"{where}; pass the run's config with --config RUN_DIR/config.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "base" in data:  # a shipped config overlaying another (configs/*.yaml)
            from transxssm_megatron.training.run_config import RunConfig

            return RunConfig.load(path, need_data=False).model, path
        return ModelConfig.from_yaml(path), path  # its `model:` section (a run dir's config.yaml is resolved)
    except (ConfigError, TypeError, yaml.YAMLError) as err:
        raise ConversionError(f"{path}: not a usable run config ({err})") from None


# --------------------------------------------------------------------------------------------- writing HF
def _tokenizer_files(tokenizer: Path, out: Path, max_length: int, rows: int) -> dict[str, int]:
    """Copy tokenizer.json and write its configs; return the special token ids for config.json."""
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    data = json.loads(tokenizer.read_text())
    vocab = {entry["content"]: entry["id"] for entry in data.get("added_tokens", [])}
    size = max([*data.get("model", {}).get("vocab", {"": -1}).values(), *vocab.values()]) + 1
    if size > rows:
        logger.warning("%s has %d tokens but the model only %d embedding rows: ids >= %d cannot be fed to it",
                       tokenizer, size, rows, rows)
    eod = vocab.get(EOD_TOKEN, 0)
    pad_token = PAD_TOKEN if PAD_TOKEN in vocab else EOD_TOKEN
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN, "pad_token": pad_token}
    # A pad token distinct from EOD lets generate() tell left padding from text (lm-eval pads with it).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": vocab.get(pad_token, eod)}


def _readme(cfg: ModelConfig, kind: str, why: str, checkpoint: Path, marker: dict, config_path: Optional[Path],
            params: int) -> str:
    from transxssm_megatron.training.checkpointing import layout_text

    run_config = config_path.read_text() if config_path is not None else "(not found)"
    remote = "" if kind == "llama" else ", trust_remote_code=True"
    return f"""---
library_name: transformers
tags: [transxssm, {cfg.architecture}, hybrid-ssm]
---
# {cfg.architecture} ({params / 1e6:.1f}M parameters)

Exported by `transxssm convert --to hf` from `{checkpoint}` (step {marker.get("step", "?")}, saved at
{layout_text(marker.get('layout'))}).
TransXSSM: hybrid Transformer / state-space language model with Unified RoPE (arXiv 2506.09507).

- Format: {"LlamaForCausalLM" if kind == "llama" else "TransXSSMForCausalLM (trust_remote_code)"}: {why}.
- {cfg.num_layers} layers ({"".join("A" if k == "sa" else "S" for k in cfg.layer_kinds())}; S = state space,
  A = attention), d = {cfg.hidden_size}, heads = {cfg.num_attention_heads}, N = {cfg.state_size}, SwiGLU
  {cfg.ffn_hidden_size}, tied embeddings; vocabulary {cfg.vocab_size} tokens padded to {cfg.padded_vocab_size} rows
  (GPT-NeoX-20B tokenizer, `<|endoftext|>` = 0 ends documents, `<|padding|>` pads).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
path = "path/to/this/folder"
model = AutoModelForCausalLM.from_pretrained(path{remote})
tokenizer = AutoTokenizer.from_pretrained(path{remote})
```

## Run config (config.yaml of the training run)

```yaml
{run_config.rstrip()}
```
"""


def write_export(out: Path, hf_tensors: dict[str, torch.Tensor], config_for_tokens, tokenizer: Path,
                 max_length: int, *, remote_code: bool, readme: str) -> Path:
    """Write an export folder atomically (built in `out`.tmp, renamed when complete): model.safetensors, tokenizer
    files, config.json = config_for_tokens(special token ids), generation_config.json, README.md and, with
    `remote_code`, the two trust_remote_code files."""
    from safetensors.torch import save_file

    out = Path(out)
    _refuse_existing(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in hf_tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokens = _tokenizer_files(tokenizer, tmp, max_length, hf_tensors["model.embed_tokens.weight"].shape[0])
        (tmp / "config.json").write_text(json.dumps(config_for_tokens(tokens), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(tokens, indent=2) + "\n")
        if remote_code:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(HERE / name, tmp / name)
        (tmp / "README.md").write_text(readme)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def to_hf(checkpoint: str | Path, out: str | Path, *, config: Optional[str | Path] = None,
          tokenizer: Optional[str | Path] = None, progress: bool = True, llama: str = "auto") -> Path:
    """Export a megatron checkpoint folder (iter_XXXXXXX) to a Hugging Face folder `out`; returns `out`.

    llama: "auto" (a `transformer` with all skip weights 1 becomes a plain Llama), "never" (always remote code)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _refuse_existing(out)
    marker = _check_checkpoint(checkpoint)
    cfg, config_path = _model_config(checkpoint, config)
    tokenizer_path = find_tokenizer(tokenizer)

    from transxssm_megatron.hf.dist_reader import read_model_tensors

    tensors = read_model_tensors(checkpoint, progress=progress)
    names.check_megatron_tensors(tensors, cfg, str(checkpoint))
    dtype = tensors["embedding.word_embeddings.weight"].dtype
    as_llama, why = names.llama_compatible(tensors, cfg)
    kind = "llama" if as_llama and llama == "auto" else "transxssm"
    if cfg.architecture == "transformer" and kind != "llama":
        logger.warning("exporting the transformer through the TransXSSM remote code: %s", why)
    table = names.LLAMA_TABLE if kind == "llama" else names.TRANSXSSM_TABLE
    hf_tensors = names.megatron_to_hf(tensors, cfg, table)
    params = sum(t.numel() for t in hf_tensors.values())

    builder = names.llama_config_dict if kind == "llama" else names.transxssm_config_dict
    write_export(out, hf_tensors, lambda tokens: builder(cfg, dtype, tokens), tokenizer_path, cfg.max_seq_length,
                 remote_code=kind != "llama",
                 readme=_readme(cfg, kind, why, checkpoint, marker, config_path, params))
    logger.info("exported %s (%s, %s, %.1fM parameters) to %s", checkpoint, cfg.architecture,
                "LlamaForCausalLM" if kind == "llama" else "TransXSSMForCausalLM, remote code", params / 1e6, out)
    return out


# --------------------------------------------------------------------------------------------- HF -> megatron
def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of its *.safetensors files)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: no config.json; pass a folder written by `transxssm convert --to hf`")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors weights in it")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return json.loads((folder / "config.json").read_text()), tensors


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_process_group():
    """A gloo group of one process with megatron's parallel state at TP=1, PP=1 (for dist_checkpointing.save)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from transxssm_megatron.training.cpu_backend import install_cpu_backend

    if dist.is_available() and dist.is_initialized():
        raise ConversionError("convert --to megatron runs as a single process; it cannot run inside a process "
                              "group (call it outside torchrun/srun)")
    if not torch.cuda.is_available():
        install_cpu_backend()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def to_megatron(hf_folder: str | Path, out: str | Path, *, step: int = 0) -> Path:
    """Write the weights of export `hf_folder` as checkpoint `out`/iter_{step:07d} (`out` becomes a checkpoints
    folder, built in `out`.tmp and renamed when complete); returns the checkpoint folder."""
    hf_folder, out = Path(hf_folder), Path(out)
    _refuse_existing(out)
    config, hf_tensors = read_hf_folder(hf_folder)
    cfg = names.model_config_from_hf(config)
    table = names.LLAMA_TABLE if config.get("model_type") == "llama" else names.TRANSXSSM_TABLE
    tensors = names.hf_to_megatron(hf_tensors, cfg, table)
    names.check_megatron_tensors(tensors, cfg, str(hf_folder))
    dtype = tensors["embedding.word_embeddings.weight"].dtype

    from transxssm_megatron.model.builder import build_model, build_transformer_config
    from transxssm_megatron.training.checkpoint_integrity import read_marker, write_marker
    from transxssm_megatron.training.checkpointing import CheckpointManager

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with single_process_group(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # deprecations, no TE
            tconfig = build_transformer_config(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                               use_cpu_initialization=True)
            model = build_model(cfg, tconfig, pre_process=True, post_process=True)
            missing, unexpected = model.load_state_dict(tensors, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ConversionError(f"{hf_folder}: the weights do not fit a megatron {cfg.architecture} model "
                                      f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
            saved = CheckpointManager(tmp, keep_last=1).save(
                step, [model], None, None, {"step": step, "consumed_samples": 0, "skipped_total": 0,
                                            "history": [], "val_history": []})
        marker = read_marker(saved)
        files = marker.pop("files")
        marker.update(weights_only=True, source=str(hf_folder.resolve()))
        write_marker(saved, marker, files)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    path = out / saved.name
    logger.info("wrote %s (model weights only: training resumes with a fresh optimizer from step %d)", path, step)
    return path
