"""Input files -> a fixed list of shards -> documents.

The shard list depends only on the inputs and ``shard_bytes`` (never on the worker count), and documents come out
of a shard in file order; merging shard outputs in shard order therefore gives the same bytes for any number of
workers, and a shard is the unit that a resumed run skips.

    parquet          row ranges [row_start, row_end) of about shard_bytes of uncompressed data
    .jsonl / .json   byte ranges of about shard_bytes, each owning the lines that *start* inside it
    .jsonl.gz / .zst one shard per file (compressed streams cannot be split)

Every document comes out as ``Doc(text, where)``, ``Empty(where)`` (empty or whitespace-only text: no tokens,
always skipped and counted) or ``Bad(reason, where, detail)``; the caller decides whether a bad one is an error or
is skipped and counted (``--skip-bad``). ``where`` is "file:line N" or "file:row N".
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
BAD_REASONS = {
    "malformed_json": "the line is not valid JSON (or not a JSON object)",
    "missing_text_column": "the text column is absent",
    "not_a_string": "the text value is not a string",
    "null_text": "the text value is null",
    "invalid_utf8": "the bytes are not valid UTF-8 (or the text holds lone surrogates)",
    "too_long": "the document is longer than --max-doc-chars",
}


class InputError(ValueError):
    """An input cannot be used; the message names the file (and line/row) and what to do."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: part of one input file."""

    index: int
    path: str
    kind: str  # "parquet" | "jsonl"
    start: int  # parquet: first row; jsonl: first byte
    end: int  # parquet: row after the last; jsonl: byte after the range (compressed: file size)
    weight: int  # input bytes on disk this shard stands for (progress bar total and ETA)
    compression: str | None = None


@dataclass
class Doc:
    text: str
    where: str
    nbytes: int = 0  # UTF-8 size of text (stats)


@dataclass
class Empty:
    """A document whose text is empty or only whitespace: common in real corpora, and it carries no tokens."""

    where: str


@dataclass
class Bad:
    reason: str
    where: str
    detail: str = ""


@dataclass
class Progress:
    """Input bytes consumed since the last report (updated by the readers)."""

    weight: int = 0


def _kind_of(path: str) -> tuple[str, str | None] | None:
    name = path.lower()
    compression = None
    for suffix, codec in COMPRESSED_SUFFIXES.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
            break
    if name.endswith(PARQUET_SUFFIXES) and compression is None:
        return "parquet", None
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    return None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively) and globs -> sorted unique list of supported files."""
    found: list[str] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"--input {item!r}: the pattern matches no file")
            candidates = matches
        else:
            candidates = [item]
        for cand in candidates:
            path = Path(cand)
            if path.is_dir():
                # Plain .json files in a folder are usually metadata (MANIFEST.json, dataset_info.json), not data:
                # folders contribute .parquet/.jsonl/.ndjson (+.gz/.zst); name .json files explicitly or by glob.
                inside = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind_of(str(p))
                                and not p.name.lower().endswith(".json"))
                if not inside:
                    raise InputError(f"--input {cand}: the folder holds no .parquet/.jsonl/.jsonl.gz/.jsonl.zst file")
                found.extend(inside)
            elif path.is_file():
                if _kind_of(cand) is None:
                    raise InputError(f"--input {cand}: unsupported file type; use .parquet, .jsonl, .json, "
                                     ".ndjson, optionally compressed as .gz or .zst")
                found.append(str(path))
            elif not any(ch in item for ch in "*?["):
                raise InputError(f"--input {cand}: no such file or folder")
    unique = list(dict.fromkeys(os.path.abspath(p) for p in found))
    if not unique:
        raise InputError("no input files")
    return unique


def parquet_text_column_check(path: str, text_column: str) -> str | None:
    """None when the file has a usable text column, else a message saying what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_column not in schema.names:
        return (f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}). Pick one with --text-column"
                + ("; python-edu parquet holds only blob ids: download the file contents first (docs/preprocess.md)"
                   if "blob_id" in schema.names else ""))
    col_type = schema.field(text_column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or pa.types.is_binary(col_type)
            or pa.types.is_large_binary(col_type)):
        return f"{path}: column {text_column!r} has type {col_type}, expected a string column"
    return None


def plan_shards(files: list[str], shard_bytes: int) -> list[Shard]:
    """Split the input files into shards of about ``shard_bytes`` (deterministic)."""
    import pyarrow.parquet as pq

    shards: list[Shard] = []
    for path in files:
        kind, compression = _kind_of(path)
        size = os.path.getsize(path)
        if kind == "parquet":
            meta = pq.ParquetFile(path).metadata
            rows = meta.num_rows
            if rows == 0:
                continue
            raw = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) or size
            rows_per_shard = max(1, int(rows * shard_bytes / raw))
            for start in range(0, rows, rows_per_shard):
                end = min(rows, start + rows_per_shard)
                shards.append(Shard(len(shards), path, kind, start, end, size * (end - start) // rows))
        elif compression is not None:
            shards.append(Shard(len(shards), path, kind, 0, size, size, compression))
        else:
            for start in range(0, max(size, 1), shard_bytes):
                end = min(size, start + shard_bytes)
                shards.append(Shard(len(shards), path, kind, start, end, end - start))
    # Adjacent weights are rounded down; the progress bar total uses the same numbers, so it still reaches 100 %.
    return shards


def validated_text(value, where: str, max_chars: int) -> Doc | Empty | Bad:
    """Turn a raw text value into a Doc, an Empty, or the reason it is bad."""
    if value is None:
        return Bad("null_text", where)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return Bad("invalid_utf8", where, str(e))
    if not isinstance(value, str):
        return Bad("not_a_string", where, f"got {type(value).__name__}")
    if not value.strip():
        return Empty(where)
    if len(value) > max_chars:
        return Bad("too_long", where, f"{len(value):,} characters > --max-doc-chars {max_chars:,}")
    try:
        nbytes = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from "\ud800" escapes in JSON; tokenizers rejects them
        return Bad("invalid_utf8", where, str(e))
    return Doc(value, where, nbytes)


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` of an uncompressed file (for messages)."""
    count = 1
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _open_decompressed(raw, compression: str):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def _parse_line(line: bytes, text_column: str, max_chars: int) -> Doc | Empty | Bad:
    """One JSON line -> Doc, Empty or Bad (``where`` left empty for the caller to fill)."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        return Bad("invalid_utf8", "", str(e))
    except ValueError as e:
        return Bad("malformed_json", "", str(e))
    if not isinstance(obj, dict):
        return Bad("malformed_json", "", f"a JSON {type(obj).__name__}, not an object")
    if text_column not in obj:
        return Bad("missing_text_column", "", f"keys: {', '.join(list(obj)[:10])}")
    return validated_text(obj[text_column], "", max_chars)


def read_jsonl(shard: Shard, text_column: str, max_chars: int, progress: Progress) -> Iterator[Doc | Empty | Bad]:
    """Documents of a JSON-lines shard. Each line owned by the shard is one JSON object."""
    raw = open(shard.path, "rb")
    try:
        if shard.compression:
            stream = io.BufferedReader(_open_decompressed(raw, shard.compression), buffer_size=1 << 20)
            line_no, offset, last_raw = 0, 0, 0
        else:
            stream = raw
            if shard.start > 0:
                raw.seek(shard.start - 1)
                # A line belongs to the shard its first byte falls in: skip the tail of the previous shard's line.
                if raw.read(1) != b"\n":
                    raw.readline()
            # Line numbers are known from the start of the file only; other shards count them on error.
            line_no = 0 if shard.start == 0 else None
            offset = last_raw = raw.tell()
        while True:
            if not shard.compression and offset >= shard.end:
                break
            line = stream.readline()
            if not line:
                break
            line_start = offset
            offset += len(line)
            if line_no is not None:
                line_no += 1
            here = raw.tell()
            progress.weight += here - last_raw
            last_raw = here
            if not line.strip():
                continue  # blank lines separate nothing in JSON lines; not a document
            result = _parse_line(line, text_column, max_chars)
            if isinstance(result, Bad):  # locate it; line numbers of byte-range shards are counted only now
                n = line_no if line_no is not None else _line_number(shard.path, line_start)
                result.where = f"{shard.path}:line {n}"
            yield result
    finally:
        raw.close()


def read_parquet(shard: Shard, text_column: str, max_chars: int, progress: Progress) -> Iterator[Doc | Empty | Bad]:
    """Documents of a parquet row range, read a row group at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    meta = pf.metadata
    row0 = 0
    per_row = shard.weight / max(1, shard.end - shard.start)
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        lo, hi = max(shard.start, row0), min(shard.end, row0 + n)
        if lo < hi:
            column = pf.read_row_group(rg, columns=[text_column]).column(0).slice(lo - row0, hi - lo)
            try:
                values = column.to_pylist()
            except UnicodeDecodeError:
                # Find the rows at fault one at a time; the good ones still come through.
                values = []
                for i in range(len(column)):
                    try:
                        values.append(column[i].as_py())
                    except UnicodeDecodeError as e:
                        values.append(e)
            for i, value in enumerate(values):
                where = f"{shard.path}:row {lo + i}"
                if isinstance(value, UnicodeDecodeError):
                    yield Bad("invalid_utf8", where, str(value))
                else:
                    result = validated_text(value, where, max_chars)
                    yield result
            progress.weight += int(per_row * (hi - lo))
        row0 += n
        if row0 >= shard.end:
            break


def read_shard(shard: Shard, text_column: str, max_chars: int, progress: Progress) -> Iterator[Doc | Empty | Bad]:
    reader = read_parquet if shard.kind == "parquet" else read_jsonl
    return reader(shard, text_column, max_chars, progress)
