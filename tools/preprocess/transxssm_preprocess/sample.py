"""The embedded sample corpus: a few MB of real text in SmolLM-Corpus's three parquet schemas.

Why assembled from the Python standard library of the interpreter running us (and not generated, and not shipped):
every machine that can run this tool has it, so the sample needs no network and no extra download; it is real
human-written English and code (a model trained on it shows a meaningful falling validation loss, which template
text would not); its license (PSF) allows redistribution of derived samples; and for a given Python version the
output is byte-for-byte deterministic (sorted inputs, no randomness, fixed metadata). MANIFEST.json records the
Python version and a hash per file so two machines can tell whether their samples match.

    cosmopedia-v2      one "textbook section" per topic of the Python language reference (pydoc_data.topics)
                       and per long module docstring
    fineweb-edu-dedup  one "web page" per stdlib module: the docstrings of its public classes and functions
    python-edu         stdlib source files (1-48 KB), with the ``text`` column that SmolLM's own download script
                       adds (the hub parquet holds only ``blob_id``; see docs/preprocess.md)

Schemas follow the dataset card of HuggingFaceTB/smollm-corpus; values we cannot know (quality scores, crawl
dumps) are fixed placeholders documented in docs/preprocess.md.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_FORMAT = 1
FILES_PER_SUBSET = 2
PYTHON_EDU_MAX_BYTES = 3_000_000  # keep code from dominating the few MB of text
PYTHON_FILE_BYTES = (1_024, 48_000)

COSMOPEDIA_SCHEMA = pa.schema([
    ("prompt", pa.string()), ("text", pa.string()), ("token_length", pa.int64()),
    ("audience", pa.string()), ("format", pa.string()), ("seed_data", pa.string()),
])
FINEWEB_SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()),
    ("metadata", pa.struct([
        ("dump", pa.string()), ("url", pa.string()), ("date", pa.timestamp("s")), ("file_path", pa.string()),
        ("language", pa.string()), ("language_score", pa.float64()), ("token_count", pa.int64()),
        ("score", pa.float64()), ("int_score", pa.int64()),
    ])),
])
# blob_id .. int_score: the hub schema; text and download_success: what SmolLM's S3 download script adds.
PYTHON_EDU_SCHEMA = pa.schema([
    ("blob_id", pa.string()), ("repo_name", pa.string()), ("path", pa.string()), ("length_bytes", pa.int64()),
    ("score", pa.float64()), ("int_score", pa.int64()), ("text", pa.string()), ("download_success", pa.bool_()),
])
SUBSETS = ("cosmopedia-v2", "fineweb-edu-dedup", "python-edu")
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the stdlib's .py files outside test folders, sorted by path."""
    root = stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append((rel.as_posix(), path.read_bytes()))
    return files


def _git_blob_id(data: bytes) -> str:
    """Software Heritage / the-stack-v2 content id (git's blob sha1), the key python-edu uses."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _clean(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines()) + "\n"


def _docs_from_sources(sources: list[tuple[str, bytes]]) -> tuple[list[dict], list[dict]]:
    """Module docstrings (textbook sections) and per-module API pages built from public docstrings."""
    sections, pages = [], []
    for rel, data in sources:
        try:
            tree = ast.parse(data.decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = _module_name(rel)
        doc = ast.get_docstring(tree) or ""
        if len(doc) >= 400:
            sections.append({"topic": module, "text": _clean(doc)})
        entries = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                node_doc = ast.get_docstring(node)
                if node_doc and len(node_doc) >= 40:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    entries.append(f"{node.name} ({kind})\n\n{node_doc.strip()}")
        if entries:
            header = f"{module}\n\n{doc.splitlines()[0].strip()}\n\n" if doc else f"{module}\n\n"
            text = _clean(header + "\n\n".join(entries))
            if len(text) >= 300:
                pages.append({"module": module, "file_path": rel, "text": text})
    return sections, pages


def _language_reference_topics() -> list[dict]:
    """The Python language reference text that `help()` shows, one entry per topic."""
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [{"topic": k, "text": _clean(v)} for k, v in sorted(topics.items()) if len(v.strip()) >= 200]
    return []


def _count_tokens(texts: list[str], tokenizer_path: Path | None) -> list[int]:
    if tokenizer_path is None:
        return [len(t) // 4 for t in texts]  # rough estimate when no tokenizer is at hand
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cosmopedia_rows(topics: list[dict], sections: list[dict], tokens: list[int]) -> list[dict]:
    rows = []
    for k, (item, n_tok) in enumerate(zip(topics + sections, tokens)):
        is_reference = k < len(topics)
        what = f"the Python language topic '{item['topic']}'" if is_reference else f"the Python module {item['topic']}"
        rows.append({
            "prompt": f"Write a textbook section for college students about {what}.",
            "text": item["text"], "token_length": n_tok, "audience": "college_students", "format": "textbook",
            "seed_data": "python_language_reference" if is_reference else "python_module_docstrings",
        })
    return rows


def build_sample(out: str | Path, tokenizer_path: str | Path | None = None) -> dict:
    """Write sample/<subset>/train-*.parquet and MANIFEST.json under ``out``; return the manifest."""
    out = Path(out)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
    py_version = sys.version.split()[0]
    sources = _stdlib_sources()
    sections, pages = _docs_from_sources(sources)
    topics = _language_reference_topics()

    cosmo_texts = [t["text"] for t in topics + sections]
    cosmo = _cosmopedia_rows(topics, sections, _count_tokens(cosmo_texts, tokenizer_path))

    page_tokens = _count_tokens([p["text"] for p in pages], tokenizer_path)
    fixed_date = dt.datetime(2024, 7, 15)  # SmolLM-Corpus release week; a constant keeps the sample deterministic
    fineweb = [{
        "text": p["text"],
        "id": f"<urn:uuid:{hashlib.sha1(p['module'].encode()).hexdigest()}>",
        "metadata": {"dump": f"python-{py_version}-stdlib", "url": f"python-stdlib:///{p['file_path']}",
                     "date": fixed_date, "file_path": p["file_path"], "language": "en", "language_score": 1.0,
                     "token_count": n_tok, "score": 3.0, "int_score": 3},
    } for p, n_tok in zip(pages, page_tokens)]

    # python-edu: hash order is a deterministic shuffle, so the byte cap does not favour modules starting with 'a'.
    code = []
    for rel, data in sources:
        if not (PYTHON_FILE_BYTES[0] <= len(data) <= PYTHON_FILE_BYTES[1]):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        code.append({"blob_id": _git_blob_id(data), "repo_name": "python/cpython", "path": f"Lib/{rel}",
                     "length_bytes": len(data), "score": 4.0, "int_score": 4, "text": text,
                     "download_success": True})
    code.sort(key=lambda r: r["blob_id"])
    python_edu, total = [], 0
    for row in code:
        if total + row["length_bytes"] > PYTHON_EDU_MAX_BYTES:
            continue
        python_edu.append(row)
        total += row["length_bytes"]

    manifest = {"sample_format": SAMPLE_FORMAT, "python": py_version, "stdlib": "python stdlib (PSF license)",
                "subsets": {}, "files": [], "documents": 0, "bytes": 0}
    for subset, rows, schema in (("cosmopedia-v2", cosmo, COSMOPEDIA_SCHEMA),
                                 ("fineweb-edu-dedup", fineweb, FINEWEB_SCHEMA),
                                 ("python-edu", python_edu, PYTHON_EDU_SCHEMA)):
        if not rows:
            raise RuntimeError(f"sample subset {subset}: found no text in {stdlib_dir()}; is the stdlib complete?")
        per_file = -(-len(rows) // FILES_PER_SUBSET)
        info = {"documents": len(rows), "bytes": sum(len(r["text"].encode()) for r in rows), "files": {}}
        for k in range(FILES_PER_SUBSET):
            name = f"{subset}/train-{k:05d}-of-{FILES_PER_SUBSET:05d}.parquet"
            chunk = rows[k * per_file:(k + 1) * per_file]
            _write_parquet_atomic(pa.Table.from_pylist(chunk, schema=schema), out / name)
            info["files"][name] = {"rows": len(chunk), "sha256": _sha256(out / name)}
            manifest["files"].append(name)
        manifest["subsets"][subset] = info
        manifest["documents"] += info["documents"]
        manifest["bytes"] += info["bytes"]
    tmp = out / ".MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "MANIFEST.json")
    return manifest
