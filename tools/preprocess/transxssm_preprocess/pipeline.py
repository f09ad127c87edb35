"""Tokenize a corpus into a megatron indexed dataset: shards in parallel, merged in order, resumable, atomic.

    inputs --plan_shards--> shards --N worker processes--> PREFIX.work/shard-*.{bin,len,json}
           --merge in shard order--> PREFIX.bin + PREFIX.idx (temporary names, renamed at the end) + PREFIX.stats.json

A shard's outputs are renamed into place with its .json last, so a .json means "this shard is complete"; a rerun
with the same inputs and settings (PREFIX.work/plan.json holds their fingerprint) skips those shards. Nothing is
written at PREFIX.bin/.idx until every shard is done and merged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .indexed import token_dtype, write_index
from .sources import (BAD_REASONS, Bad, Doc, Empty, InputError, Progress, Shard, expand_inputs,
                      parquet_text_column_check, plan_shards, read_shard, validated_text)
from .tokenizer import EOD_TOKEN, TokenizerInfo, load_tokenizer, resolve_tokenizer

PLAN_FORMAT = 1
BATCH_CHARS = 4_000_000  # tokenize in batches of about this many characters: amortizes Python overhead
MAX_EXAMPLES = 20  # skipped documents listed by location in stats.json


class BadInputError(InputError):
    """A bad document was met without --skip-bad."""


@dataclass(frozen=True)
class Options:
    """Settings that change the output bytes (all of them go into the resume fingerprint)."""

    text_column: str = "text"
    append_eod: bool = True
    max_doc_chars: int = 50_000_000
    skip_bad: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Worker side


_WORKER: dict = {}


def _init_worker(tokenizer_json: str, tokenizer_sha: str, single_threaded: bool, report_queue) -> None:
    if single_threaded:
        # One process per core: the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_json, tokenizer_sha)
    _WORKER["queue"] = report_queue


def _queue_report(*counts) -> None:
    _WORKER["queue"].put(counts)


def _atomic_rename_all(pairs: list[tuple[Path, Path]]) -> None:
    for tmp, final in pairs:
        os.replace(tmp, final)


def _tokenize_batch(texts: list[str], eod_id: int | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all ``texts`` back to back (EOD after each when eod_id is set) and per-document lengths.

    A text that gives no token (possible only for text the tokenizer normalizes away) is left out: it would be
    a document of nothing but EOD. The caller counts it as empty (len(texts) - len(lengths))."""
    encodings = _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings if e.ids]
    if eod_id is not None:
        for doc in ids:
            doc.append(eod_id)
    lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _process_documents(docs: Iterable[Doc | Empty | Bad], out_stem: Path, opts: Options, eod_id: int | None, dtype,
                       progress: Progress, report: Callable) -> dict:
    """Tokenize ``docs`` into out_stem.{bin,len} (+ .json, written last); return the shard's stats.

    Empty documents are skipped and counted ("empty_skipped"); bad ones stop the run, or with --skip-bad are
    skipped and counted by reason ("skipped")."""
    bin_tmp, len_tmp = out_stem.with_suffix(".bin.tmp"), out_stem.with_suffix(".len.tmp")
    stats = {"documents": 0, "tokens": 0, "text_bytes": 0, "empty_skipped": 0, "skipped": {}, "skipped_examples": [],
             "max_doc_tokens": 0}
    lengths_all: list[np.ndarray] = []
    batch: list[str] = []
    batch_chars = batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_chars, batch_bytes
        if not batch:
            return
        flat, lengths = _tokenize_batch(batch, eod_id, dtype)
        flat.tofile(bin_file)
        lengths_all.append(lengths)
        text_bytes = batch_bytes
        stats["documents"] += lengths.size
        stats["empty_skipped"] += len(batch) - lengths.size
        stats["tokens"] += int(flat.size)
        stats["text_bytes"] += text_bytes
        stats["max_doc_tokens"] = max(stats["max_doc_tokens"], int(lengths.max(initial=0)))
        report(progress.weight, lengths.size, int(flat.size), text_bytes)
        progress.weight = 0
        batch, batch_chars, batch_bytes = [], 0, 0

    with open(bin_tmp, "wb") as bin_file:
        for item in docs:
            if isinstance(item, Empty):
                stats["empty_skipped"] += 1
                continue
            if isinstance(item, Bad):
                if not opts.skip_bad:
                    raise BadInputError(
                        f"{item.where}: {BAD_REASONS[item.reason]}" + (f" ({item.detail})" if item.detail else "")
                        + ". Fix the input, or pass --skip-bad to skip such documents and count them in stats.json.")
                stats["skipped"][item.reason] = stats["skipped"].get(item.reason, 0) + 1
                if len(stats["skipped_examples"]) < MAX_EXAMPLES:
                    stats["skipped_examples"].append(f"{item.where}: {item.reason}")
                continue
            batch.append(item.text)
            batch_chars += len(item.text)
            batch_bytes += item.nbytes
            if batch_chars >= BATCH_CHARS:
                flush()
        flush()
        if progress.weight:
            report(progress.weight, 0, 0, 0)
        bin_file.flush()
        os.fsync(bin_file.fileno())
    lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
    with open(len_tmp, "wb") as f:
        lengths.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    json_tmp = out_stem.with_suffix(".json.tmp")
    json_tmp.write_text(json.dumps(stats))
    _atomic_rename_all([(bin_tmp, out_stem.with_suffix(".bin")), (len_tmp, out_stem.with_suffix(".len")),
                        (json_tmp, out_stem.with_suffix(".json"))])
    return stats


def _run_file_shard(shard: Shard, work_dir: str, opts: Options, eod_id: int | None, dtype_name: str,
                    report: Callable | None = None) -> int:
    progress = Progress()
    docs = read_shard(shard, opts.text_column, opts.max_doc_chars, progress)
    _process_documents(docs, Path(work_dir) / f"shard-{shard.index:06d}", opts, eod_id, np.dtype(dtype_name).type,
                       progress, report or _queue_report)
    return shard.index


def _run_text_shard(index: int, items: list, where_prefix: str, first: int, work_dir: str, opts: Options,
                    eod_id: int | None, dtype_name: str, report: Callable | None = None) -> int:
    """A shard of an in-memory stream (Hugging Face streaming or a Python iterable): rows -> Doc/Bad."""
    def docs():
        for k, item in enumerate(items):
            where = f"{where_prefix}:row {first + k}"
            if isinstance(item, dict):
                if opts.text_column not in item:
                    yield Bad("missing_text_column", where, f"keys: {', '.join(list(item)[:10])}")
                    continue
                item = item[opts.text_column]
            yield validated_text(item, where, opts.max_doc_chars)

    _process_documents(docs(), Path(work_dir) / f"shard-{index:06d}", opts, eod_id, np.dtype(dtype_name).type,
                       Progress(), report or _queue_report)
    return index


# ---------------------------------------------------------------------------------------------------------------
# Main process


class _Bar:
    """tqdm progress bar over input bytes (ETA when the size is known) with docs/s, tokens/s, MB/s of text."""

    def __init__(self, total: int | None, enabled: bool, done_weight: int = 0):
        self.start = time.monotonic()
        self.docs = self.tokens = self.text_bytes = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done_weight, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="preprocess", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, weight: int, docs: int, tokens: int, text_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        if self.bar is not None:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tok/s, "
                                     f"{self.text_bytes / elapsed / 1e6:.1f} MB/s text", refresh=False)
            self.bar.update(weight)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prepare_work_dir(work_dir: Path, plan: dict, restart: bool) -> None:
    plan_path = work_dir / "plan.json"
    if work_dir.exists():
        old = None
        if plan_path.is_file():
            try:
                old = json.loads(plan_path.read_text())
            except json.JSONDecodeError:
                old = None
        if old is not None and old.get("fingerprint") == plan["fingerprint"] and not restart:
            return
        if old is not None and not restart:
            raise InputError(f"{work_dir} holds a partial run with different inputs or settings; pass --restart to "
                             f"discard it, or rerun with the original arguments to resume it")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    tmp = work_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, plan_path)


def _done_shards(work_dir: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in work_dir.glob("shard-*.json")}


def _merge(work_dir: Path, n_shards: int, prefix: Path, dtype) -> tuple[int, np.ndarray]:
    """Concatenate the shard outputs in order into PREFIX.bin/.idx via temporary names; return (tokens, lengths)."""
    bin_tmp, idx_tmp = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
    lengths = []
    with open(bin_tmp, "wb") as out:
        for i in range(n_shards):
            stem = work_dir / f"shard-{i:06d}"
            with open(stem.with_suffix(".bin"), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            lengths.append(np.fromfile(stem.with_suffix(".len"), dtype=np.int64))
        out.flush()
        os.fsync(out.fileno())
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    tokens = int(lengths.sum())
    if bin_tmp.stat().st_size != tokens * np.dtype(dtype).itemsize:
        raise RuntimeError(f"{bin_tmp}: size does not match the shard lengths; rerun with --restart")
    write_index(idx_tmp, dtype, lengths)
    # The .idx goes last: megatron and `validate` look for it, so a crash between the two renames leaves a
    # .bin without a matching .idx, which `validate` reports, never an index pointing past its data.
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx_tmp, f"{prefix}.idx")
    return tokens, lengths


def _collect_stats(work_dir: Path, n_shards: int) -> dict:
    total = {"documents": 0, "tokens": 0, "text_bytes": 0, "empty_skipped": 0, "skipped": {}, "skipped_examples": [],
             "max_doc_tokens": 0}
    for i in range(n_shards):
        s = json.loads((work_dir / f"shard-{i:06d}.json").read_text())
        for key in ("documents", "tokens", "text_bytes", "empty_skipped"):
            total[key] += s.get(key, 0)
        total["max_doc_tokens"] = max(total["max_doc_tokens"], s["max_doc_tokens"])
        for reason, count in s["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + count
        room = MAX_EXAMPLES - len(total["skipped_examples"])
        total["skipped_examples"].extend(s["skipped_examples"][:room])
    return total


def preprocess(inputs: list[str] | None, output_prefix: str | os.PathLike, tokenizer: str, *,
               text_column: str = "text", workers: int = 1, skip_bad: bool = False, append_eod: bool = True,
               eod_token: str = EOD_TOKEN, max_doc_chars: int = 50_000_000, shard_mb: float | None = None,
               overwrite: bool = False, restart: bool = False, progress: bool = True,
               hf_dataset: str | None = None, hf_config: str | None = None, hf_split: str = "train",
               documents: Iterable | None = None, documents_name: str = "documents",
               docs_per_shard: int = 20_000) -> dict:
    """Tokenize ``inputs`` (files, folders, globs) into ``output_prefix``.bin/.idx; return the stats dict.

    Alternatively stream ``hf_dataset`` (+``hf_config``, ``hf_split``; needs `datasets` and network) or any
    iterable ``documents`` of strings or dicts holding ``text_column``. Output bytes do not depend on ``workers``.
    Raises InputError (or its subclass BadInputError) naming the file and line/row at fault.
    """
    started = time.monotonic()
    prefix = Path(output_prefix)
    _check_output_folder(prefix)
    stats_path = Path(f"{prefix}.stats.json")
    if not overwrite and (Path(f"{prefix}.bin").exists() or Path(f"{prefix}.idx").exists()):
        raise InputError(f"{prefix}.bin/.idx already exist; pass --overwrite to replace them")
    if sum(x is not None and x != [] for x in (inputs, hf_dataset, documents)) != 1:
        raise InputError("give exactly one of --input files, --hf-dataset, or a documents iterable")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    tok = resolve_tokenizer(tokenizer, eod_token if append_eod else None)
    dtype = token_dtype(tok.vocab_size)
    opts = Options(text_column=text_column, append_eod=append_eod, max_doc_chars=max_doc_chars, skip_bad=skip_bad)
    output_settings = {k: v for k, v in asdict(opts).items() if k != "skip_bad"}  # skip_bad never changes bytes
    eod_id = tok.eod_id if append_eod else None

    if inputs:
        files = expand_inputs(list(inputs))
        problems = {f: p for f in files if f.endswith(".parquet") and (p := parquet_text_column_check(f, text_column))}
        if problems and not skip_bad:
            raise InputError(next(iter(problems.values())) + ", or pass --skip-bad to skip such files")
        skipped_files = list(problems.values())
        usable = [f for f in files if f not in problems]
        if shard_mb is None:
            # Enough shards to keep many workers busy on small inputs, 64 MB ones on big inputs. Derived from the
            # input size only (never the worker count), so a run resumes whatever --workers it is given.
            total_bytes = sum(os.path.getsize(f) for f in usable)
            shard_mb = min(64.0, max(1.0, total_bytes / 256 / 2**20))
        shards = plan_shards(usable, int(shard_mb * 1024 * 1024))
        input_list = [{"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns} for f in files]
        source = {"files": input_list}
    else:
        skipped_files = []
        shards = None
        name = f"hf:{hf_dataset}/{hf_config}/{hf_split}" if hf_dataset else documents_name
        input_list = [{"stream": name}]
        source = {"stream": name, "docs_per_shard": docs_per_shard}

    plan = {"format": PLAN_FORMAT, "tool_version": __version__,
            "fingerprint": _fingerprint({"source": source, "tokenizer": tok.sha256, "settings": output_settings,
                                          "shard_mb": shard_mb, "format": PLAN_FORMAT}),
            "shards": [asdict(s) for s in shards] if shards is not None else None}
    work_dir = Path(f"{prefix}.work")
    _prepare_work_dir(work_dir, plan, restart)
    done = _done_shards(work_dir)

    runner = _ShardRunner(workers, tok, progress, streaming=shards is None)
    try:
        if shards is not None:
            pending = [s for s in shards if s.index not in done]
            runner.start(total=sum(s.weight for s in shards), done_weight=sum(s.weight for s in shards if s.index in done))
            for shard in pending:
                runner.submit(_run_file_shard, shard, str(work_dir), opts, eod_id, np.dtype(dtype).name)
            runner.finish()
            n_shards = len(shards)
        else:
            stream = documents if documents is not None else _hf_stream(hf_dataset, hf_config, hf_split)
            runner.start(total=None, done_weight=0)
            n_shards = 0
            where_prefix = input_list[0]["stream"]
            for index, chunk in enumerate(_chunks(stream, docs_per_shard)):
                n_shards = index + 1
                if index not in done:
                    runner.submit(_run_text_shard, index, chunk, where_prefix, index * docs_per_shard,
                                  str(work_dir), opts, eod_id, np.dtype(dtype).name)
            runner.finish()
    finally:
        runner.close()

    total = _collect_stats(work_dir, n_shards)
    if total["documents"] == 0:
        shutil.rmtree(work_dir)  # every shard is done: nothing to resume
        raise InputError(_nothing_to_write(inputs, input_list, prefix, total, skipped_files))
    tokens, lengths = _merge(work_dir, n_shards, prefix, dtype)
    assert tokens == total["tokens"]
    stats = {
        "tool": "transxssm-preprocess", "tool_version": __version__,
        "output_prefix": str(prefix), "bin_bytes": os.path.getsize(f"{prefix}.bin"),
        "idx_bytes": os.path.getsize(f"{prefix}.idx"), "dtype": np.dtype(dtype).name,
        "documents": total["documents"], "tokens": total["tokens"], "text_bytes": total["text_bytes"],
        "max_doc_tokens": total["max_doc_tokens"], "empty_skipped": total["empty_skipped"],
        "skipped": total["skipped"], "skipped_total": sum(total["skipped"].values()),
        "skipped_examples": total["skipped_examples"], "skipped_files": skipped_files,
        "tokenizer": {"source": tok.source, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eod_token": tok.eod_token if append_eod else None, "eod_id": eod_id},
        "settings": output_settings | {"skip_bad": skip_bad, "shard_mb": shard_mb},
        "inputs": input_list, "shards": n_shards, "shards_resumed": len(done & set(range(n_shards))),
        "workers": workers, "seconds": round(time.monotonic() - started, 3),
    }
    tmp = stats_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n")
    os.replace(tmp, stats_path)
    shutil.rmtree(work_dir)
    if progress:
        print(summary_line(stats), file=sys.stderr)
    return stats


def summary_line(stats: dict) -> str:
    """The console summary of a finished run: every count, so that nothing is dropped silently."""
    return (f"[preprocess] {stats['output_prefix']}.bin/.idx: {stats['documents']:,} documents written, "
            f"{stats['tokens']:,} tokens, {_skip_counts(stats)}, {stats['seconds']:.1f} s")


def _skip_counts(total: dict) -> str:
    bad = sum(total["skipped"].values())
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(total["skipped"].items()))
    return f"{total['empty_skipped']:,} empty skipped, {bad:,} bad skipped" + (f" ({reasons})" if reasons else "")


def _check_output_folder(prefix: Path) -> None:
    """Fail before any work when PREFIX's folder cannot be created or written (messages name --output-prefix)."""
    folder = prefix.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--output-prefix {prefix}: cannot create the folder {folder} ({e.strerror}); choose a "
                         "writable location") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"--output-prefix {prefix}: cannot write in {folder} ({e.strerror}); choose a writable "
                         "location") from None


def _nothing_to_write(inputs: list[str] | None, input_list: list[dict], prefix: Path, total: dict,
                      skipped_files: list[str]) -> str:
    """The one-line error for a run whose inputs hold no usable document."""
    names = [item.get("path") or item.get("stream") for item in input_list]
    where = ("--input " if inputs else "") + ", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                                                     if len(names) > 3 else "")
    counts = _skip_counts(total) + (f", {len(skipped_files)} files skipped" if skipped_files else "")
    if skipped_files or total["skipped"]:
        why = "every document was empty or bad input, skipped by --skip-bad"
    elif total["empty_skipped"]:
        why = "every document is empty or whitespace-only"
    else:
        why = "the inputs hold no documents"
    return (f"{where}: no documents to write ({counts}): {why}. Nothing was written at {prefix}.bin/.idx; check "
            "the input files and --text-column")


def _chunks(iterable: Iterable, size: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _hf_stream(name: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError as e:
        raise InputError("--hf-dataset needs the `datasets` package: pip install 'transxssm-megatron[hf]'") from e
    return datasets.load_dataset(name, config, split=split, streaming=True)


def _start_method(streaming: bool) -> str:
    """How to start workers. fork when reading files and no other Python thread runs: workers then start in
    milliseconds with the tokenizer already loaded (numpy's BLAS and pyarrow, the native libraries loaded here, handle
    fork). spawn for streams (`datasets` runs network threads) and where fork does not exist."""
    if not streaming and threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


class _ShardRunner:
    """Runs shard jobs in this process (workers == 1) or in a process pool, feeding one progress bar."""

    def __init__(self, workers: int, tok: TokenizerInfo, progress: bool, streaming: bool):
        self.workers, self.tok, self.progress, self.streaming = workers, tok, progress, streaming
        self.pool = self.queue = self.bar = None
        self.pending: list = []

    def start(self, total: int | None, done_weight: int) -> None:
        if self.workers == 1:
            _init_worker(self.tok.json_text, self.tok.sha256, single_threaded=False, report_queue=None)
        else:
            ctx = mp.get_context(_start_method(self.streaming))
            self.queue = ctx.Queue()
            if ctx.get_start_method() == "fork":
                load_tokenizer(self.tok.json_text, self.tok.sha256)  # children inherit it: no 2 MB JSON parse each
            self.pool = ctx.Pool(self.workers, initializer=_init_worker,
                                 initargs=(self.tok.json_text, self.tok.sha256, True, self.queue))
        self.bar = _Bar(total, self.progress, done_weight)  # after the fork: tqdm starts a monitor thread

    def submit(self, fn: Callable, *args) -> None:
        if self.pool is None:
            fn(*args, report=self.bar.update)
            return
        self.pending.append(self.pool.apply_async(fn, args))
        # Bound the work in flight (streams hold their documents in memory): wait while 2 per worker are queued.
        while sum(not r.ready() for r in self.pending) >= 2 * self.workers:
            self._drain(0.1)
        self._raise_failures()

    def finish(self) -> None:
        if self.pool is None:
            return
        while not all(r.ready() for r in self.pending):
            self._drain(0.1)
            self._raise_failures()
        self._drain(0)
        self._raise_failures()

    def _drain(self, timeout: float) -> None:
        try:
            while True:
                self.bar.update(*self.queue.get(timeout=timeout))
                timeout = 0
        except queue_mod.Empty:
            pass

    def _raise_failures(self) -> None:
        for r in self.pending:
            if r.ready() and not r.successful():
                r.get()  # re-raises the worker's exception here

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.bar is not None:
            self.bar.close()
