"""Load a model for inference from an export folder or straight from a megatron checkpoint.

    model, tokenizer, folder = load_causal_lm(PATH, device="auto", dtype="auto")

PATH is a Hugging Face export folder (config.json), a megatron checkpoint (iter_XXXXXXX, converted on the fly into
a temporary export), or a checkpoints / run folder (its newest complete checkpoint). The model is loaded through
`AutoModelForCausalLM(trust_remote_code=True)`, exactly as a user of the export would; eval mode, no grad needed.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from transxssm_megatron.hf.names import ConversionError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _newest_checkpoint(path: Path) -> Optional[Path]:
    """The newest checkpoint with a COMPLETE marker in a checkpoints folder or a run folder."""
    from transxssm_megatron.training.checkpoint_integrity import marked_folders

    for folder in (path, path / "checkpoints"):
        complete = marked_folders(folder)
        if complete:
            return complete[-1]
    return None


def as_hf_folder(path: str | Path, config: Optional[str | Path] = None, tokenizer: Optional[str | Path] = None
                 ) -> Path:
    """An export folder for PATH: PATH itself, or a temporary export of the megatron checkpoint it names (removed at
    exit)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise ConversionError(f"{path}: no such export folder or checkpoint")
    checkpoint = path if (path / "COMPLETE").exists() or (path / ".metadata").exists() else _newest_checkpoint(path)
    if checkpoint is None:
        raise ConversionError(f"{path}: neither an export folder (config.json) nor a megatron checkpoint; pass one "
                              f"written by `transxssm convert --to hf` or a checkpoint such as "
                              f"RUN_DIR/checkpoints/iter_0001000")
    from transxssm_megatron.hf.convert import to_hf

    scratch = Path(tempfile.mkdtemp(prefix="transxssm-export-"))
    atexit.register(shutil.rmtree, scratch, True)
    logger.info("converting %s to a temporary Hugging Face export in %s", checkpoint, scratch)
    return to_hf(checkpoint, scratch / "model", config=config, tokenizer=tokenizer, progress=False)


def load_causal_lm(path: str | Path, device: str = "auto", dtype: str = "auto", config=None, tokenizer=None):
    """(model in eval mode on `device`, tokenizer, export folder). dtype: auto (as saved) | float32 | bfloat16."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = as_hf_folder(path, config=config, tokenizer=tokenizer)
    kwargs = {"trust_remote_code": True}
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).to(resolve_device(device)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    return model, tok, folder
