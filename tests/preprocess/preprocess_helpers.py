"""Helpers for the preprocessing tests: small corpora with known documents, read back through megatron."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
from pathlib import Path

_WORDS = ("the model reads tokens from an indexed dataset while the optimizer waits; état naïve café 東京 "
          "データ 🙂 x=1+2 def f(a, b): return a*b # comment\n\tindent µs Ω ß").split(" ")


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (5, 300)) -> list[str]:
    """Random NFC documents (the NeoX tokenizer NFC-normalizes, so only NFC text round-trips byte for byte)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words)))
        if rng.random() < 0.3:
            text = "  " + text + "\n\n"  # leading / trailing whitespace must survive
        docs.append(unicodedata.normalize("NFC", text))
    return docs


def write_jsonl(path: Path, docs: list, key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: Path, docs: list, key: str = "text", row_group_size: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: pa.array(docs, pa.string()), "n": list(range(len(docs)))}), path,
                   row_group_size=row_group_size)
    return path


def read_documents(prefix) -> list:
    """Documents of a dataset as numpy arrays, read through megatron-core's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    # Copy: the arrays are views of a memory map that closes when `ds` is garbage-collected.
    return [np.array(ds[i]) for i in range(len(ds))]
