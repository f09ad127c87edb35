"""Load a tokenizer for preprocessing, and fingerprint it: a `tokenizers` tokenizer.json (file, folder or hub name)
or a SentencePiece model (`.model`, as Llama and Mistral ship it).

Both kinds reach the workers as text (`TokenizerInfo.json_text`): the tokenizer.json itself, or, for SentencePiece,
a one-key JSON object holding the model file in base64. `load_tokenizer` turns that text back into an object with
`encode_batch_fast(texts, add_special_tokens=False)` returning encodings with `.ids`, the one call the pipeline
makes.

End of document. For a tokenizer.json, `--eod-token` (default `<|endoftext|>`) must be one of its tokens. For a
SentencePiece model the default stands for the model's own end-of-sequence piece (`</s>` in Llama and Mistral, its
`eos_id`); another `--eod-token` must be a piece of the model.

BOS. Never added, for either kind. Llama and Mistral put `<s>` at the start of each sequence they are given (the
Hugging Face `add_bos_token` setting; the `.model` file records no such convention), but pretraining data is one
stream of documents that GPTDataset cuts into sequences at arbitrary offsets, so a BOS per document would not start
the sequences anyway; the EOD after each document marks the boundaries.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"  # GPT-NeoX's end of document; for a SentencePiece model: the model's own EOS
_SENTENCEPIECE_KEY = "sentencepiece_model"  # the key of the JSON text that carries a SentencePiece model (base64)


@dataclass(frozen=True)
class TokenizerInfo:
    """What workers need to rebuild the same tokenizer, and what stats.json records."""

    source: str  # what the user passed
    json_text: str  # the serialized tokenizer (see the module docstring); workers load from this
    sha256: str  # identifies the tokenizer in stats.json and in the resume fingerprint (a .model: of the file)
    vocab_size: int
    eod_id: int | None
    eod_token: str | None = None  # the token eod_id stands for (`</s>` for a Llama SentencePiece model)
    kind: str = "tokenizers"  # or "sentencepiece"


_LOADED: dict[str, object] = {}  # sha256 -> tokenizer: loading the 2 MB JSON costs ~0.3 s, and runs repeat it


def load_tokenizer(json_text: str, sha256: str | None = None):
    """The tokenizer serialized in `json_text` (a `tokenizers.Tokenizer` or a `SentencePieceTokenizer`), reused
    across calls in this process."""
    key = sha256 or hashlib.sha256(json_text.encode()).hexdigest()
    if key not in _LOADED:
        _LOADED.clear()  # keep one: a process works with one tokenizer at a time
        if json_text.startswith('{"' + _SENTENCEPIECE_KEY):
            _LOADED[key] = SentencePieceTokenizer(base64.b64decode(json.loads(json_text)[_SENTENCEPIECE_KEY]))
        else:
            from tokenizers import Tokenizer

            _LOADED[key] = Tokenizer.from_str(json_text)
    return _LOADED[key]


# ----------------------------------------------------------------------------------------------------------------
# SentencePiece

@dataclass
class _Encoding:
    ids: list[int]


class SentencePieceTokenizer:
    """A SentencePiece model behind the one `tokenizers.Tokenizer` call the pipeline makes. Adds neither BOS nor
    EOS (the pipeline appends the EOD itself). Text such as `</s>` inside a document is encoded as text: SentencePiece
    emits control pieces only by id."""

    def __init__(self, model: bytes):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = False) -> list[_Encoding]:
        # The pipeline sets RAYON_NUM_THREADS=1 in its one-process-per-core workers (for `tokenizers`): the same
        # reason holds here. Alone in the main process, SentencePiece may use every core.
        threads = 1 if os.environ.get("RAYON_NUM_THREADS") == "1" else -1
        ids = self.processor.encode(list(texts), out_type=int, add_bos=False, add_eos=False, num_threads=threads)
        return [_Encoding(doc) for doc in ids]


def _load_sentencepiece(spec: str, path: Path, eod_token: str | None) -> TokenizerInfo:
    where = spec if Path(spec) == path else f"{spec} ({path})"
    hint = "expected a SentencePiece model file such as the tokenizer.model of a Llama or Mistral checkpoint"
    try:
        model = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--tokenizer {where}: cannot read the file ({e.strerror})") from None
    if importlib.util.find_spec("sentencepiece") is None:
        raise ValueError(f"--tokenizer {where}: SentencePiece models need the sentencepiece package "
                         f"(pip install sentencepiece)")
    try:
        processor = SentencePieceTokenizer(model).processor
    except Exception as e:  # sentencepiece raises RuntimeError or OSError for a file it cannot parse
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"--tokenizer {where}: not a SentencePiece model ({reason}); {hint}") from None
    eod_id = None
    if eod_token == EOD_TOKEN:
        eod_id = processor.eos_id()
        if eod_id < 0:
            raise ValueError(f"--tokenizer {where}: the SentencePiece model has no end-of-sequence piece (eos_id "
                             f"-1); pass --eod-token PIECE naming one of its pieces, or --no-eod")
    elif eod_token:
        eod_id = processor.piece_to_id(eod_token)
        if eod_id == processor.unk_id() and processor.id_to_piece(eod_id) != eod_token:
            eos = processor.eos_id()
            fix = (f"leave --eod-token at its default for the model's end-of-sequence piece "
                   f"{processor.id_to_piece(eos)!r}" if eos >= 0 else "name one of its pieces")
            raise ValueError(f"--tokenizer {where}: the SentencePiece model has no {eod_token!r} piece; {fix}, or "
                             f"pass --no-eod")
    text = json.dumps({_SENTENCEPIECE_KEY: base64.b64encode(model).decode("ascii")})
    return TokenizerInfo(spec, text, hashlib.sha256(model).hexdigest(), processor.get_piece_size(), eod_id,
                         None if eod_id is None else processor.id_to_piece(eod_id), "sentencepiece")


# ----------------------------------------------------------------------------------------------------------------
# tokenizers JSON

def _load_file(spec: str, path: Path):
    """(Tokenizer, its JSON text) from a local file; ValueError naming --tokenizer and the file when it is not one."""
    hint = ("expected a `tokenizers` tokenizer.json such as .assets/tokenizer/gpt-neox-20b.json "
            "(`transxssm-preprocess assets --out .assets` writes it) or a SentencePiece .model file")
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
    """``spec``: a tokenizer.json path, a SentencePiece `.model` path, a folder holding tokenizer.json (or else
    tokenizer.model), or a Hugging Face hub name (online only). ``eod_token``: see the module docstring; None: no
    EOD."""
    from tokenizers import Tokenizer

    path = Path(spec)
    if path.is_dir():
        json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
        path = model_file if model_file.is_file() and not json_file.is_file() else json_file
    if path.suffix == ".model" and path.is_file():
        return _load_sentencepiece(spec, path, eod_token)
    if path.is_file():
        tok, text = _load_file(spec, path)
    elif os.sep in spec and not path.exists() or spec.endswith((".json", ".model")):
        raise ValueError(f"--tokenizer {spec}: no such file. Run `transxssm-preprocess assets --out .assets` for "
                         ".assets/tokenizer/gpt-neox-20b.json, pass a SentencePiece .model file, or give a hub name "
                         "such as EleutherAI/gpt-neox-20b")
    else:
        try:
            tok = Tokenizer.from_pretrained(spec)
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"--tokenizer {spec}: not a local file, and loading it from the Hugging Face hub failed "
                             f"({reason}). Offline? Pass a local tokenizer.json or SentencePiece .model.") from None
        text = tok.to_str()
    eod_id = None
    if eod_token:
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise ValueError(f"--tokenizer {spec}: has no {eod_token!r} token; pass --eod-token or --no-eod")
    return TokenizerInfo(spec, text, hashlib.sha256(text.encode()).hexdigest(),
                         tok.get_vocab_size(with_added_tokens=True), eod_id, eod_token if eod_id is not None else None)
