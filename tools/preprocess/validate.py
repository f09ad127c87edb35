"""Check a PREFIX.bin/.idx pair: header, sizes, dtype, offsets, document indices, token ids < vocab, EOD placement."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .indexed import read_index


def validate_dataset(prefix: str | os.PathLike, *, vocab_size: int | None = None, eod_id: int | None = None,
                     expected_documents: int | None = None, chunk_tokens: int = 1 << 26) -> dict:
    """Return a summary dict with ``ok`` and a list of ``problems`` (empty when the pair is sound).

    vocab_size: every id must be < vocab_size. eod_id: every document must end with it.
    expected_documents: the number of documents the caller expects (e.g. from stats.json).
    """
    prefix = str(prefix)
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    problems: list[str] = []
    for path in (bin_path, idx_path):
        if not path.is_file():
            return {"prefix": prefix, "ok": False, "problems": [f"{path}: missing"]}
    try:
        index = read_index(idx_path)
    except ValueError as e:
        return {"prefix": prefix, "ok": False, "problems": [str(e)]}
    dtype = np.dtype(index.dtype)
    lengths = index.sequence_lengths.astype(np.int64)
    n = lengths.size
    if index.file_bytes != index.expected_file_bytes:
        problems.append(f"{idx_path}: {index.file_bytes} bytes, expected {index.expected_file_bytes} "
                        "(extra bytes: a multimodal index or a corrupt file)")
    if n and lengths.min() < 0:
        problems.append(f"{idx_path}: negative sequence length at sequence {int(np.argmin(lengths))}")
    expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1] * dtype.itemsize)]) if n else lengths
    if not np.array_equal(index.sequence_pointers, expected_pointers):
        bad = int(np.argmax(index.sequence_pointers != expected_pointers))
        problems.append(f"{idx_path}: sequence pointer {bad} is {int(index.sequence_pointers[bad])}, expected "
                        f"{int(expected_pointers[bad])} (sequences must be stored back to back)")
    docs = index.document_indices
    if docs.size == 0 or docs[0] != 0 or docs[-1] != n or np.any(np.diff(docs) < 0):
        problems.append(f"{idx_path}: document indices must rise from 0 to the sequence count {n}")
    tokens = int(lengths.sum())
    bin_bytes = bin_path.stat().st_size
    if bin_bytes != tokens * dtype.itemsize:
        problems.append(f"{bin_path}: {bin_bytes} bytes, but the index describes {tokens} tokens of {dtype.name} "
                        f"= {tokens * dtype.itemsize} bytes")
    documents = max(int(docs.size) - 1, 0)
    if expected_documents is not None and documents != expected_documents:
        problems.append(f"{idx_path}: {documents} documents, expected {expected_documents}")
    max_id = None
    eod_missing = 0
    if not problems:
        data = np.memmap(bin_path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype)
        for start in range(0, tokens, chunk_tokens):
            chunk_max = int(data[start:start + chunk_tokens].max())
            max_id = chunk_max if max_id is None else max(max_id, chunk_max)
        if vocab_size is not None and max_id is not None and max_id >= vocab_size:
            where = int(np.argmax(data >= vocab_size))
            problems.append(f"{bin_path}: token id {max_id} >= vocab size {vocab_size} (first at token {where})")
        if eod_id is not None and n:
            ends = np.cumsum(lengths) - 1
            nonempty = lengths > 0
            eod_missing = int(np.sum(data[ends[nonempty]] != eod_id) + np.sum(~nonempty))
            if eod_missing:
                first = int(np.flatnonzero(~nonempty | (data[np.maximum(ends, 0)] != eod_id))[0])
                problems.append(f"{prefix}: {eod_missing} documents do not end with EOD id {eod_id} "
                                f"(first: document {first})")
    return {"prefix": prefix, "ok": not problems, "problems": problems, "dtype": dtype.name,
            "documents": documents, "sequences": n, "tokens": tokens, "max_token_id": max_id,
            "bin_bytes": bin_bytes, "idx_bytes": index.file_bytes}
