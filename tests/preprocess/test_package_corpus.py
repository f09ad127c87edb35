"""bench/package_corpus.py on a small folder of its own: every skip rule, the split by file, the cap, corpus.json,
and one-line errors for bad arguments."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import multiprocessing.pool
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transxssm_preprocess.indexed import read_index

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "package_corpus.py"
_TOPICS = ("parser", "scheduler", "cache", "tokenizer", "optimizer", "planner", "reader", "writer", "encoder",
           "decoder", "window", "ledger")


def _code(i: int, topic: str) -> str:
    lines = [f'"""The {topic} module: helpers that a reader can follow without the rest of the package."""', ""]
    for k in range(8):
        lines += [f"def {topic}_step_{k}(value, scale={i + k}):",
                  f'    """Return the value after step {k} of the {topic}, scaled by {i + k}; never negative."""',
                  f"    result = value * scale + {k * 7 + i}",
                  "    return max(result, 0)", ""]
    return "\n".join(lines)


def _prose(i: int, topic: str) -> str:
    return "\n".join(f"The {topic} keeps paragraph {k} of note {i} short: it says what changed, why, and what a "
                     f"reader should try next when the {topic} misbehaves." for k in range(12)) + "\n"


# path under the root -> text; every one of these is kept
GOOD = {
    "alpha/__init__.py": _code(0, _TOPICS[0]),
    "alpha/core.py": _code(1, _TOPICS[1]),
    "alpha/docs/guide.md": "# Guide\n\n" + _prose(2, _TOPICS[2]),
    "alpha/deep/er/module.py": _code(3, _TOPICS[3]),
    "beta/README.rst": "Beta\n====\n\n" + _prose(4, _TOPICS[4]),
    "beta/util.py": _code(5, _TOPICS[5]),
    "beta/notes.txt": _prose(6, _TOPICS[6]),
    "gamma.py": _code(7, _TOPICS[7]),
    "delta/api.py": _code(8, _TOPICS[8]),
    "delta/CHANGES.md": _prose(9, _TOPICS[9]),
    "epsilon/io.py": _code(10, _TOPICS[10]),
    "epsilon/HISTORY.txt": _prose(11, _TOPICS[11]),
}
# path -> (bytes, the reason it is skipped)
BAD = {
    "alpha/core_copy.py": (GOOD["alpha/core.py"].encode(), "duplicate"),
    "beta/latin1.py": ("# caf\xe9 au lait\nprint('caf\xe9')\n".encode("latin-1"), "not_utf8"),
    "big/huge.txt": (("A line of ordinary words that repeats until the file passes one megabyte.\n" * 15_000).encode(),
                     "too_large"),
    "data/table.txt": ("\n".join(f"{k}, {k * 0.5:.4f}, {k ** 2}" for k in range(400)).encode(), "few_letters"),
    "data/blob.txt": (b"header\n\x00\x01\x02\x03binary payload\x00\n", "binary"),
    "mini/bundle.py": (("var" + "abcdefghij" * 700 + "\n").encode(), "long_lines"),
    "gen/table.py": (("MAPPING = {\n" + "    'alphabet': 'letters',\n" * 3000 + "}\n").encode(), "repetitive"),
    "alpha/empty/__init__.py": (b"  \n\n", "empty"),
}
# never looked at: other extensions, caches, package metadata, hidden folders, other interpreters' packages
IGNORED = {
    "alpha/data.json": b'{"text": "not a source file"}',
    "alpha/__pycache__/core.py": b"cached = True\n",
    "alpha-1.0.dist-info/LICENSE.txt": b"Permission is hereby granted to everyone who reads this.\n",
    ".hidden/secret.py": b"token = 'hidden folder'\n",
    "lib/site-packages/other.py": b"other = 'another interpreter'\n",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packages")
    files = {**{k: v.encode() for k, v in GOOD.items()}, **{k: v for k, (v, _) in BAD.items()}, **IGNORED}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _documents(prefix: Path, tokenizer) -> list[str]:
    """Each document's text, read through our .idx reader (EOD dropped)."""
    info = read_index(f"{prefix}.idx")
    ids = np.memmap(f"{prefix}.bin", dtype=info.dtype, mode="r")
    docs = []
    for length, pointer in zip(info.sequence_lengths, info.sequence_pointers):
        start = int(pointer) // np.dtype(info.dtype).itemsize
        doc = ids[start: start + int(length)].tolist()
        assert doc[-1] == 0  # GPT-NeoX's <|endoftext|>
        docs.append(tokenizer.decode(doc[:-1]))
    return docs


@pytest.fixture(scope="module")
def corpus(root, tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp("corpus")
    result = _run("--out", out, "--roots", root, "--max-mb", 0.1, "--valid-fraction", 0.3, "--workers", 2,
                  "--tokenizer", tokenizer_path)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "corpus.json").read_text()), result.stderr


def test_outputs_split_by_file(corpus, tokenizer):
    out, info, _ = corpus
    train, valid = _documents(out / "train", tokenizer), _documents(out / "valid", tokenizer)
    assert train and valid
    by_text = {text: rel for rel, text in GOOD.items()}
    assert len(by_text) == len(GOOD)
    # every document is one whole kept file, and no file is on both sides
    assert sorted(train + valid) == sorted(GOOD.values())
    assert not set(train) & set(valid)
    assert sorted(by_text[t] for t in valid) == sorted(f["path"] for f in info["valid_files"])


def test_corpus_json_counts(corpus, root):
    out, info, stderr = corpus
    assert info["files"] == len(GOOD)
    assert info["bytes"] == sum(len(t.encode()) for t in GOOD.values())
    assert info["candidates"] == len(GOOD) + len(BAD)
    assert info["cap_reached"] is False
    expected_skips = {reason: 0 for reason in info["skipped"]}
    for _, reason in BAD.values():
        expected_skips[reason] += 1
    assert info["skipped"] == expected_skips

    by_ext, by_package = {}, {}
    for rel, text in GOOD.items():
        ext, package = Path(rel).suffix, rel.split("/")[0].removesuffix(".py")
        for table, key in ((by_ext, ext), (by_package, package)):
            table.setdefault(key, {"files": 0, "bytes": 0})
            table[key]["files"] += 1
            table[key]["bytes"] += len(text.encode())
    assert info["by_extension"] == by_ext
    assert info["by_package"] == by_package
    assert [(r["path"], r["files"]) for r in info["roots"]] == [(str(root.resolve()), len(GOOD))]

    splits = info["splits"]
    assert splits["train"]["files"] + splits["valid"]["files"] == len(GOOD)
    for name in ("train", "valid"):
        idx = read_index(out / f"{name}.idx")
        stats = json.loads((out / f"{name}.stats.json").read_text())
        assert splits[name]["documents"] == splits[name]["files"] == len(idx.sequence_lengths)
        assert splits[name]["tokens"] == int(idx.sequence_lengths.sum()) == stats["tokens"]
        assert splits[name]["bytes"] == stats["text_bytes"]
    assert info["tokens"] == splits["train"]["tokens"] + splits["valid"]["tokens"]
    assert not (out / "corpus.work").exists()
    assert stderr.strip().splitlines()[-1].startswith(f"[package_corpus] {out}: {len(GOOD)} files")


def test_cap_stops_collecting(root, tmp_path, tokenizer_path, corpus):
    cap_mb = 0.006
    result = _run("--out", tmp_path, "--roots", root, "--max-mb", cap_mb, "--valid-fraction", 0.3,
                  "--tokenizer", tokenizer_path)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "corpus.json").read_text())
    assert info["cap_reached"] is True
    assert 0 < info["files"] < len(GOOD) and info["bytes"] <= cap_mb * 1e6
    # files are taken in the same order whatever the cap, and go to the same side
    assert {f["path"] for f in info["valid_files"]} <= {f["path"] for f in corpus[1]["valid_files"]}


def test_empty_split_is_an_error(root, tmp_path, tokenizer_path):
    result = _run("--out", tmp_path, "--roots", root, "--max-mb", 0.003, "--valid-fraction", 0.3,
                  "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no file went to the valid split")
    assert not (tmp_path / "train.bin").exists() and not (tmp_path / "corpus.work").exists()


@pytest.mark.parametrize("args, words", [
    (["--valid-fraction", "1.5"], "--valid-fraction"),
    (["--max-mb", "0"], "--max-mb"),
    (["--workers", "0"], "--workers"),
    (["--roots", "/no/such/folder"], "/no/such/folder"),
    (["--tokenizer", "/no/such/tokenizer.json"], "--tokenizer"),
])
def test_bad_arguments_one_line_error(tmp_path, root, tokenizer_path, args, words):
    base = {"--roots": str(root), "--tokenizer": str(tokenizer_path)}
    base.update(dict(zip(args[::2], args[1::2])))
    result = _run("--out", tmp_path / "out", *[x for kv in base.items() for x in kv])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_existing_output_needs_overwrite(corpus, root, tokenizer_path):
    out, _, _ = corpus
    result = _run("--out", out, "--roots", root, "--tokenizer", tokenizer_path)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr


def test_stopping_early_finishes_the_batches_in_flight_and_ends_the_workers(root, monkeypatch):
    """A consumer that closes the checking iterator early (the cap) gets control back with every worker process
    ended and the pool closed, not terminated (terminate with tasks in flight can hang for good)."""
    spec = importlib.util.spec_from_file_location("package_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)   # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BATCH_FILES", 2)       # several batches, most of them never consumed
    roots = [(str(root), "given")]
    candidates = module.find_candidates(roots)
    assert len(candidates) >= 8
    earlier = set(multiprocessing.active_children())     # other tests' helpers (a SyncManager) may still run
    terminated, terminate = [], multiprocessing.pool.Pool.terminate
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", lambda self: terminated.append(self) or terminate(self))
    results = module.checked_in_order(candidates, roots, workers=2)
    first = [next(results) for _ in range(3)]
    results.close()
    assert set(multiprocessing.active_children()) <= earlier and terminated == []
    full = list(module.checked_in_order(candidates, roots, workers=2))
    assert [(c.reason, c.sha1) for c in full[:3]] == [(c.reason, c.sha1) for c in first]
    assert set(multiprocessing.active_children()) <= earlier and terminated == []
