"""A real text corpus built offline from what is already on disk: the source files and documentation of the
installed Python packages and of the standard library, tokenized into train and held-out validation datasets.

    python bench/package_corpus.py --out DIR [--max-mb 400] [--valid-fraction 0.01] [--workers N]
                                   [--roots DIR ...] [--tokenizer .assets/tokenizer/gpt-neox-20b.json]

Writes DIR/train.bin/.idx, DIR/valid.bin/.idx (+ their .stats.json from `transxssm-preprocess run`) and
DIR/corpus.json: the roots searched, the files and bytes per extension and per top-level package, what was skipped
and why, and the documents and tokens of each split.

Each kept file is one document (its text as is, EOD after it). Files are found under --roots (default: this
interpreter's site-packages folders and its standard library) with the extensions .py .md .rst .txt, outside
__pycache__, *.dist-info, *.egg-info and hidden folders, and outside site-packages / dist-packages folders below a
root (the standard library's folder may hold another interpreter's packages). Skipped, and counted by reason:

    too_large     over 1 MB (generated tables, data dumps)
    not_utf8      not valid UTF-8
    binary        NUL bytes, or more than 1 % control characters
    long_lines    a line over 5,000 bytes (minified or generated code, serialized data)
    few_letters   under 30 % of the non-blank bytes are letters (numeric test data, code-point tables)
    repetitive    the first 64 KB compress to under 8 % (generated lookup tables, serialized patterns)
    empty         nothing but whitespace (empty __init__.py files)
    unreadable    cannot be read (permissions, a file removed meanwhile)
    duplicate     the same bytes as a file kept earlier (sha1): vendored copies, repeated licenses

Files are taken in the order of a hash of their path relative to their root, so a --max-mb cap samples every
package alike rather than the first ones in the alphabet, and collection stops at the first kept file that would
pass the cap. A file goes wholly to one split, chosen by another hash of that relative path (validation below
--valid-fraction): the same file lands on the same side on every machine and for every cap.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import site
import sys
import sysconfig
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"
if importlib.util.find_spec("transxssm_preprocess") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "tools" / "preprocess"))

EXTENSIONS = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 1_000_000
MAX_LINE_BYTES = 5_000
MIN_LETTER_FRACTION = 0.30
MAX_CONTROL_FRACTION = 0.01
MIN_COMPRESSED_FRACTION = 0.08  # zlib level 1 on the first 64 KB: human-written code and prose stay above ~0.15
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
SKIP_DIR_SUFFIXES = (".dist-info", ".egg-info")
SKIP_REASONS = ("too_large", "not_utf8", "binary", "long_lines", "few_letters", "repetitive", "empty", "unreadable",
                "duplicate")
BATCH_FILES = 1024  # files per batch handed to the workers; two batches are in flight, the cap is checked between

_LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)) + bytes(range(0x80, 0x100))
_WHITESPACE = b" \t\n\r\x0b\x0c"
_CONTROL = bytes(c for c in range(32) if c not in b"\t\n\r\x0b\x0c") + b"\x7f"


class CorpusError(ValueError):
    """A bad argument or an unusable input; the message names the option or folder and what to do."""


@dataclass(frozen=True)
class Candidate:
    root: int  # index into the roots list
    rel: str  # path relative to the root, "/"-separated: the key of the order and of the split


@dataclass
class Checked:
    reason: str | None  # a SKIP_REASONS entry, or None: keep
    line: bytes = b""  # the document as one JSON line, {"text": ..., "path": ...}
    nbytes: int = 0  # UTF-8 bytes of the text
    sha1: str = ""


def _digest(tag: bytes, rel: str) -> bytes:
    return hashlib.sha1(tag + b"\0" + rel.encode("utf-8", "surrogateescape")).digest()


def in_validation(rel: str, valid_fraction: float) -> bool:
    return int.from_bytes(_digest(b"split", rel)[:8], "big") < valid_fraction * 2**64


def default_roots() -> list[tuple[str, str]]:
    """(folder, kind) of this interpreter's site-packages folders, then its standard library."""
    paths = sysconfig.get_paths()
    sites = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return [(p, "site-packages") for p in sites] + [(paths["stdlib"], "stdlib")]


def _unique_roots(roots: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for path, kind in roots:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append((real, kind))
    return out


def find_candidates(roots: list[tuple[str, str]]) -> list[Candidate]:
    """Files with a text extension under the roots, in the deterministic order of a hash of their relative path.
    A folder that is itself one of the roots is searched only as that root."""
    root_set = {path for path, _ in roots}
    found = []
    for index, (root, _) in enumerate(roots):
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(SKIP_DIR_SUFFIXES)
                                               or os.path.join(folder, d) in root_set)]
            for name in files:
                if name.lower().endswith(EXTENSIONS):  # no stat here: sizes are learnt by reading, in parallel
                    rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                    found.append(Candidate(index, rel))
    found.sort(key=lambda c: (_digest(b"order", c.rel), c.root, c.rel))
    return found


def check_file(path: str, rel: str) -> Checked:
    """Read one file and decide whether it is human-written text (the rules: the module docstring)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:  # permissions, a dangling link, a file removed meanwhile
        return Checked("unreadable")
    if len(data) > MAX_FILE_BYTES:
        return Checked("too_large")
    if b"\0" in data or len(data) - len(data.translate(None, _CONTROL)) > MAX_CONTROL_FRACTION * len(data):
        return Checked("binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Checked("not_utf8")
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text, data = text[1:], data[3:]
    if not text.strip():
        return Checked("empty")
    if max(map(len, data.split(b"\n"))) > MAX_LINE_BYTES:
        return Checked("long_lines")
    visible = len(data.translate(None, _WHITESPACE))
    letters = visible - len(data.translate(None, _LETTERS + _WHITESPACE))
    if letters < MIN_LETTER_FRACTION * visible:
        return Checked("few_letters")
    head = data[:65536]
    if len(zlib.compress(head, 1)) < MIN_COMPRESSED_FRACTION * len(head):
        return Checked("repetitive")
    record = {"text": text, "path": rel.encode("utf-8", "backslashreplace").decode()}
    line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
    return Checked(None, line, len(data), hashlib.sha1(data).hexdigest())


def _check_job(job: tuple[str, str]) -> Checked:
    return check_file(*job)


def checked_in_order(candidates: list[Candidate], roots: list[tuple[str, str]], workers: int) -> Iterator[Checked]:
    """check_file of every candidate, in candidate order, computed by ``workers`` processes two batches ahead of
    the consumer (which may stop early: close the iterator to stop the workers).

    A consumer that stops early lets the batches in flight finish, then the pool closes: Pool.terminate() with
    tasks in flight can hang for good (CPython's pool races its own task handler), and they take a moment."""
    jobs = ((os.path.join(roots[c.root][0], c.rel), c.rel) for c in candidates)
    if workers == 1:
        yield from map(_check_job, jobs)
        return
    batches = iter(lambda: [job for _, job in zip(range(BATCH_FILES), jobs)], [])
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers)
    in_flight = collections.deque()
    try:
        in_flight.extend(pool.imap(_check_job, batch, chunksize=8) for batch in (next(batches, []), next(batches, [])))
        while in_flight:
            batch = next(batches, None)
            if batch is not None:
                in_flight.append(pool.imap(_check_job, batch, chunksize=8))
            yield from in_flight[0]
            in_flight.popleft()
        pool.close()
    except GeneratorExit:
        try:
            for results in in_flight:
                collections.deque(results, maxlen=0)
        finally:
            pool.close()
        raise
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def package_of(rel: str, kind: str) -> str:
    """The top-level package (or single-file module) a file belongs to; standard library ones as stdlib:NAME."""
    top = rel.split("/", 1)[0]
    if "/" not in rel:
        top = top.rsplit(".", 1)[0]
    return f"stdlib:{top}" if kind == "stdlib" else top


def collect(roots: list[tuple[str, str]], max_bytes: int, valid_fraction: float, workers: int,
            writers: dict) -> dict:
    """Check candidates in order, keep up to ``max_bytes`` of text, write each kept file as a JSON line to
    writers["train"] or writers["valid"]; return the composition (counts, bytes, skips, validation file list)."""
    candidates = find_candidates(roots)
    if not candidates:
        raise CorpusError(f"--roots {' '.join(r for r, _ in roots)}: no {'/'.join(EXTENSIONS)} file found")
    skipped = Counter()
    seen: set[str] = set()
    total = {"files": 0, "bytes": 0}
    by_ext: dict = defaultdict(lambda: {"files": 0, "bytes": 0})
    by_package: dict = defaultdict(lambda: {"files": 0, "bytes": 0})
    by_root = [{"path": path, "kind": kind, "files": 0, "bytes": 0} for path, kind in roots]
    splits = {name: {"files": 0, "bytes": 0} for name in ("train", "valid")}
    valid_files = []
    cap_reached = False
    examined = 0
    with contextlib.closing(checked_in_order(candidates, roots, workers)) as results:
        for c, checked in zip(candidates, results):
            if checked.reason is None and checked.sha1 in seen:
                checked.reason = "duplicate"
            if checked.reason is not None:
                skipped[checked.reason] += 1
                examined += 1
                continue
            if total["bytes"] + checked.nbytes > max_bytes:
                cap_reached = True
                break
            examined += 1
            seen.add(checked.sha1)
            split = "valid" if in_validation(c.rel, valid_fraction) else "train"
            writers[split].write(checked.line)
            ext = os.path.splitext(c.rel)[1].lower()
            for counts in (total, by_ext[ext], by_package[package_of(c.rel, roots[c.root][1])], by_root[c.root],
                           splits[split]):
                counts["files"] += 1
                counts["bytes"] += checked.nbytes
            if split == "valid":
                valid_files.append({"root": c.root, "path": c.rel})
    return {
        "candidates": len(candidates), "examined": examined, "cap_reached": cap_reached,
        "files": total["files"], "bytes": total["bytes"],
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
        "by_extension": dict(sorted(by_ext.items())),
        "by_package": dict(sorted(by_package.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        "roots": by_root, "splits": splits, "valid_files": valid_files,
    }


def build_corpus(out: Path, *, roots: list[tuple[str, str]], max_mb: float, valid_fraction: float, workers: int,
                 tokenizer: str, overwrite: bool = False) -> dict:
    """Collect, split and tokenize; write OUT/{train,valid}.bin/.idx and OUT/corpus.json; return corpus.json's
    content."""
    from transxssm_preprocess import preprocess
    from transxssm_preprocess.tokenizer import resolve_tokenizer

    started = time.monotonic()
    if not max_mb > 0:
        raise CorpusError(f"--max-mb must be > 0, got {max_mb}")
    if not 0 < valid_fraction < 1:
        raise CorpusError(f"--valid-fraction must be between 0 and 1 (exclusive), got {valid_fraction}")
    if workers < 1:
        raise CorpusError(f"--workers must be >= 1, got {workers}")
    for path, kind in roots:
        if kind == "given" and not os.path.isdir(path):
            raise CorpusError(f"--roots {path}: no such folder")
    if not Path(tokenizer).exists():
        raise CorpusError(f"--tokenizer {tokenizer}: no such file; run `transxssm-preprocess assets --out .assets` "
                          "for .assets/tokenizer/gpt-neox-20b.json, or pass a tokenizer.json")
    resolve_tokenizer(tokenizer)  # a bad file fails now, before minutes of collecting
    if not overwrite:
        existing = [str(out / f"{s}.{e}") for s in ("train", "valid") for e in ("bin", "idx")
                    if (out / f"{s}.{e}").exists()]
        if existing:
            raise CorpusError(f"{existing[0]} already exists; pass --overwrite to replace the corpus in {out}")
    roots = _unique_roots(roots)
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = out / "corpus.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError as e:
        raise CorpusError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder") from None

    try:
        jsonl = {name: work / f"{name}.jsonl" for name in ("train", "valid")}
        with open(jsonl["train"], "wb") as train, open(jsonl["valid"], "wb") as valid:
            info = collect(roots, int(max_mb * 1e6), valid_fraction, workers, {"train": train, "valid": valid})
        collected = time.monotonic()
        print(f"[package_corpus] collected {info['files']:,} files, {info['bytes'] / 1e6:,.1f} MB of text "
              f"({info['splits']['valid']['files']:,} for validation) from {info['examined']:,} of "
              f"{info['candidates']:,} files in {collected - started:.1f} s; tokenizing", file=sys.stderr, flush=True)
        for name in ("train", "valid"):
            if info["splits"][name]["files"] == 0:
                hint = "raise --valid-fraction" if name == "valid" else "lower --valid-fraction"
                raise CorpusError(f"no file went to the {name} split ({info['files']} files kept); {hint} or raise "
                                  "--max-mb")
        stats = {name: preprocess([str(jsonl[name])], out / name, tokenizer, workers=workers, overwrite=True,
                                  restart=True, progress=False) for name in ("train", "valid")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for name, s in stats.items():
        info["splits"][name].update(prefix=str(out / name), documents=s["documents"], tokens=s["tokens"],
                                    stats=f"{name}.stats.json")
    finished = time.monotonic()
    corpus = {
        "corpus": "source files and documentation of installed Python packages and the standard library",
        "python": sys.version.split()[0], "executable": sys.executable,
        "settings": {"max_mb": max_mb, "valid_fraction": valid_fraction, "workers": workers,
                     "tokenizer": str(tokenizer), "tokenizer_sha256": stats["train"]["tokenizer"]["sha256"],
                     "extensions": list(EXTENSIONS), "max_file_bytes": MAX_FILE_BYTES,
                     "max_line_bytes": MAX_LINE_BYTES, "min_letter_fraction": MIN_LETTER_FRACTION,
                     "min_compressed_fraction": MIN_COMPRESSED_FRACTION},
        **{k: info[k] for k in ("roots", "candidates", "examined", "cap_reached", "files", "bytes", "skipped",
                                "splits", "by_extension", "by_package")},
        "tokens": sum(s["tokens"] for s in stats.values()),
        "seconds": {"collect": round(collected - started, 2), "tokenize": round(finished - collected, 2),
                    "total": round(finished - started, 2)},
        "valid_files": info["valid_files"],
    }
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(corpus, indent=1) + "\n")
    os.replace(tmp, out / "corpus.json")
    return corpus


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="writes OUT/train.bin/.idx, OUT/valid.bin/.idx, "
                   "OUT/corpus.json")
    p.add_argument("--max-mb", type=float, default=400, help="stop collecting at this many MB (1e6 bytes) of text")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of files held out for validation")
    p.add_argument("--workers", type=int, default=_cores(), help="processes checking files and tokenizing")
    p.add_argument("--roots", nargs="+", metavar="DIR",
                   help="folders to search (default: this interpreter's site-packages and standard library)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer.json or SentencePiece .model")
    p.add_argument("--overwrite", action="store_true", help="replace the datasets already in OUT")
    args = p.parse_args(argv)

    roots = [(r, "given") for r in args.roots] if args.roots else default_roots()
    try:
        corpus = build_corpus(args.out, roots=roots, max_mb=args.max_mb, valid_fraction=args.valid_fraction,
                              workers=args.workers, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except ValueError as e:  # CorpusError, and the preprocessing tool's InputError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    s, skipped = corpus["splits"], {k: v for k, v in corpus["skipped"].items() if v}
    reasons = f" ({', '.join(f'{k} {v:,}' for k, v in skipped.items())})" if skipped else ""
    print(f"[package_corpus] {args.out}: {corpus['files']:,} files, {corpus['bytes'] / 1e6:,.1f} MB -> train "
          f"{s['train']['documents']:,} docs {s['train']['tokens']:,} tokens, valid {s['valid']['documents']:,} docs "
          f"{s['valid']['tokens']:,} tokens; skipped {sum(skipped.values()):,} files{reasons}; "
          f"{corpus['seconds']['total']:.1f} s (collect {corpus['seconds']['collect']:.1f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
