"""The megatron-core indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and read with numpy.

Written from the format megatron-core 0.19's ``IndexedDataset`` reads (one sequence per document, no modes):

    .bin   token ids of all documents back to back, dtype uint16 (vocab < 65,500) or int32
    .idx   b"MMIDIDX\\x00\\x00"  | u64 version = 1 | u8 dtype code | u64 sequence_count (S) | u64 document_count (S+1)
           | int32[S] sequence lengths (tokens) | int64[S] byte offsets into .bin | int64[S+1] document indices 0..S

Writing this ourselves (instead of megatron's IndexedDatasetBuilder, which appends lengths to Python lists one
document at a time) lets the merge step write each array in one call. Tests check that megatron reads it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> type:
    """The dtype megatron's tools pick for a vocabulary: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65_500 else np.int32


def write_index(idx_path: str | Path, dtype: type, lengths: np.ndarray) -> None:
    """Write an .idx for documents of ``lengths`` tokens (int, shape (S,)), each one sequence."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("document lengths must fit in int32 (megatron's .idx stores them as int32)")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    count = lengths.size
    with open(idx_path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


@dataclass
class IndexInfo:
    """What an .idx file says. Arrays are read-only views of the file."""

    dtype: type
    sequence_lengths: np.ndarray  # int32 (S,)
    sequence_pointers: np.ndarray  # int64 (S,) byte offsets into .bin
    document_indices: np.ndarray  # int64 (D,) sequence index where each document starts; last = S
    file_bytes: int
    expected_file_bytes: int


class IndexFormatError(ValueError):
    """An .idx file that megatron cannot read; the message names the file and the field at fault."""


def read_index(idx_path: str | Path) -> IndexInfo:
    """Parse an .idx file (header, then memory-mapped arrays: milliseconds even for a 100 MB index).

    Raises IndexFormatError naming the file and what is wrong with it. Extra bytes after the arrays are not an
    error here (``file_bytes`` > ``expected_file_bytes``); `integrity.check_dataset` rejects them."""
    idx_path = Path(idx_path)
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if size == 0:
        raise IndexFormatError(f"{idx_path}: empty file (0 bytes), not a megatron .idx")
    if header[: len(INDEX_MAGIC)] != INDEX_MAGIC[: len(header)]:
        raise IndexFormatError(f"{idx_path}: not a megatron .idx file (bad magic header)")
    if len(header) < HEADER_BYTES:
        raise IndexFormatError(f"{idx_path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    offset = len(INDEX_MAGIC)
    (version,) = struct.unpack_from("<Q", header, offset)
    (code,) = struct.unpack_from("<B", header, offset + 8)
    seq_count, doc_count = struct.unpack_from("<QQ", header, offset + 9)
    if version != INDEX_VERSION:
        raise IndexFormatError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
    if code not in CODE_DTYPES:
        raise IndexFormatError(f"{idx_path}: unknown dtype code {code} (megatron's codes are "
                               f"{min(CODE_DTYPES)}-{max(CODE_DTYPES)})")
    if not np.issubdtype(CODE_DTYPES[code], np.integer):
        raise IndexFormatError(f"{idx_path}: dtype code {code} ({np.dtype(CODE_DTYPES[code]).name}) is not an "
                               "integer type, so the .bin cannot hold token ids")
    if doc_count < 1:
        raise IndexFormatError(f"{idx_path}: document count 0 in the header (an index lists at least the "
                               "boundary 0)")
    expected = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if size < expected:
        raise IndexFormatError(f"{idx_path}: truncated: {size} bytes, header promises {expected} "
                               f"({seq_count} sequences, {doc_count} document indices)")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = mm[HEADER_BYTES: HEADER_BYTES + 4 * seq_count].view(np.int32)
    start = HEADER_BYTES + 4 * seq_count
    pointers = mm[start: start + 8 * seq_count].view(np.int64)
    start += 8 * seq_count
    docs = mm[start: start + 8 * doc_count].view(np.int64)
    return IndexInfo(CODE_DTYPES[code], lengths, pointers, docs, size, expected)
