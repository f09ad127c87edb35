"""Check a PREFIX.bin/.idx pair: the structure training relies on (`integrity.check_dataset`: header, sizes, dtype,
pointers, document indices, not empty), then the contents: document count, token ids < vocab, EOD placement."""

from __future__ import annotations

import os

import numpy as np

from .integrity import DatasetError, check_dataset


def validate_dataset(prefix: str | os.PathLike, *, vocab_size: int | None = None, eod_id: int | None = None,
                     expected_documents: int | None = None, chunk_tokens: int = 1 << 26) -> dict:
    """Return a summary dict with ``ok`` and a list of ``problems`` (empty when the pair is sound).

    A structural fault is the only problem reported (the contents cannot be read meaningfully past it).
    vocab_size: every id must be < vocab_size. eod_id: every document must end with it.
    expected_documents: the number of documents the caller expects (e.g. from stats.json).
    """
    prefix = str(prefix)
    try:
        summary = check_dataset(prefix)
    except DatasetError as err:
        return {"prefix": prefix, "ok": False, "problems": [str(err)]}
    bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
    dtype, lengths, tokens = summary.dtype, summary.sequence_lengths.astype(np.int64), summary.tokens
    problems: list[str] = []
    if expected_documents is not None and summary.documents != expected_documents:
        problems.append(f"{idx_path}: {summary.documents} documents, expected {expected_documents}")
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    max_id = None
    for start in range(0, tokens, chunk_tokens):
        chunk_max = int(data[start:start + chunk_tokens].max())
        max_id = chunk_max if max_id is None else max(max_id, chunk_max)
    if vocab_size is not None and max_id is not None and max_id >= vocab_size:
        where = int(np.argmax(data >= vocab_size))
        problems.append(f"{bin_path}: token id {max_id} >= vocab size {vocab_size} (first at token {where})")
    if eod_id is not None:
        ends = np.cumsum(lengths) - 1
        nonempty = lengths > 0
        eod_missing = int(np.sum(data[ends[nonempty]] != eod_id) + np.sum(~nonempty))
        if eod_missing:
            first = int(np.flatnonzero(~nonempty | (data[np.maximum(ends, 0)] != eod_id))[0])
            problems.append(f"{prefix}: {eod_missing} documents do not end with EOD id {eod_id} "
                            f"(first: document {first})")
    return {"prefix": prefix, "ok": not problems, "problems": problems, "dtype": dtype.name,
            "documents": summary.documents, "sequences": summary.sequences, "tokens": tokens,
            "max_token_id": max_id, "bin_bytes": summary.bin_bytes, "idx_bytes": summary.idx_bytes}
