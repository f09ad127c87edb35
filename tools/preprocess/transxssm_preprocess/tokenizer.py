"""Load a `tokenizers` tokenizer from a local tokenizer.json (file or folder) or a hub name, and fingerprint it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerInfo:
    """What workers need to rebuild the same tokenizer, and what stats.json records."""

    source: str  # what the user passed
    json_text: str  # the serialized tokenizer; workers load from this, so hub and local paths behave alike
    sha256: str  # of json_text: identifies the tokenizer in stats.json and in the resume fingerprint
    vocab_size: int
    eod_id: int | None


_LOADED: dict[str, object] = {}  # sha256 -> Tokenizer: loading the 2 MB JSON costs ~0.3 s, and runs repeat it


def load_tokenizer(json_text: str, sha256: str | None = None):
    """A `tokenizers.Tokenizer` from its JSON text, reused across calls in this process."""
    from tokenizers import Tokenizer

    key = sha256 or hashlib.sha256(json_text.encode()).hexdigest()
    if key not in _LOADED:
        _LOADED.clear()  # keep one: a process works with one tokenizer at a time
        _LOADED[key] = Tokenizer.from_str(json_text)
    return _LOADED[key]


def _load_file(spec: str, path: Path):
    """(Tokenizer, its JSON text) from a local file; ValueError naming --tokenizer and the file when it is not one."""
    hint = ("expected a `tokenizers` tokenizer.json such as .assets/tokenizer/gpt-neox-20b.json "
            "(`transxssm-preprocess assets --out .assets` writes it)")
    where = spec if Path(spec) == path else f"{spec} ({path})"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"--tokenizer {where}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--tokenizer {where}: not a tokenizer file (not UTF-8 text); {hint}") from None
    try:
        return load_tokenizer(text), text
    except Exception as e:  # tokenizers raises a plain Exception for bad JSON or an unknown layout
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"--tokenizer {where}: not a tokenizer file ({reason}); {hint}") from None


def resolve_tokenizer(spec: str, eod_token: str | None = EOD_TOKEN) -> TokenizerInfo:
    """``spec``: a tokenizer.json path, a folder holding tokenizer.json, or a Hugging Face hub name (online only)."""
    from tokenizers import Tokenizer

    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        tok, text = _load_file(spec, path)
    elif os.sep in spec and not path.exists() or spec.endswith(".json"):
        raise ValueError(f"--tokenizer {spec}: no such file. Run `transxssm-preprocess assets --out .assets` for "
                         ".assets/tokenizer/gpt-neox-20b.json, or give a hub name such as EleutherAI/gpt-neox-20b")
    else:
        try:
            tok = Tokenizer.from_pretrained(spec)
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"--tokenizer {spec}: not a local file, and loading it from the Hugging Face hub failed "
                             f"({reason}). Offline? Pass a local tokenizer.json.") from None
        text = tok.to_str()
    eod_id = None
    if eod_token:
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise ValueError(f"--tokenizer {spec}: has no {eod_token!r} token; pass --eod-token or --no-eod")
    return TokenizerInfo(spec, text, hashlib.sha256(text.encode()).hexdigest(),
                         tok.get_vocab_size(with_added_tokens=True), eod_id)
