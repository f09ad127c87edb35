"""Documents in -> .bin/.idx -> megatron IndexedDataset -> detokenized documents equal the inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transxssm_preprocess import preprocess, validate_dataset
from transxssm_preprocess.indexed import read_index

from preprocess_helpers import make_docs, read_documents, write_jsonl, write_parquet


def test_assets_tokenizer_facts(tokenizer):
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 50_280
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.encode("Hello world", add_special_tokens=False).ids == [12092, 1533]
    assert tokenizer.id_to_token(50_279) == "|||IP_ADDRESS|||"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "jsonl.gz", "jsonl.zst"])
def test_round_trip_and_eod(tmp_path, tokenizer_path, tokenizer, fmt):
    docs = make_docs(60, seed=hash(fmt) % 1000)
    if fmt == "parquet":
        src = write_parquet(tmp_path / "in.parquet", docs)
    else:
        src = write_jsonl(tmp_path / "in.jsonl", docs)
        if fmt != "jsonl":
            raw = src.read_bytes()
            src = tmp_path / f"in.{fmt}"
            if fmt.endswith("gz"):
                import gzip
                src.write_bytes(gzip.compress(raw))
            else:
                import zstandard
                src.write_bytes(zstandard.ZstdCompressor().compress(raw))
    stats = preprocess([str(src)], tmp_path / "out", str(tokenizer_path), progress=False)

    out_docs = read_documents(tmp_path / "out")
    assert len(out_docs) == len(docs) == stats["documents"]
    for text, ids in zip(docs, out_docs):
        assert ids.dtype == np.uint16
        assert ids[-1] == 0 and not np.any(ids[:-1] == 0), "exactly one EOD, at the end of each document"
        assert tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False) == text
        # ids identical to the tokenizers library encoding the same text
        assert ids[:-1].tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    assert stats["tokens"] == sum(len(d) for d in out_docs)
    assert stats["text_bytes"] == sum(len(d.encode()) for d in docs)
    assert stats["tokenizer"]["eod_id"] == 0 and stats["dtype"] == "uint16"
    assert json.loads((tmp_path / "out.stats.json").read_text())["documents"] == len(docs)
    assert not (tmp_path / "out.work").exists()
    report = validate_dataset(tmp_path / "out", vocab_size=50_280, eod_id=0, expected_documents=len(docs))
    assert report["ok"], report["problems"]


def test_index_layout_matches_megatron_builder(tmp_path, tokenizer_path):
    """Our .idx is byte-identical to the one megatron's IndexedDatasetBuilder writes for the same documents."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = make_docs(30, seed=3)
    preprocess([str(write_jsonl(tmp_path / "in.jsonl", docs))], tmp_path / "ours", str(tokenizer_path),
               progress=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for ids in read_documents(tmp_path / "ours"):
        builder.add_document(torch.from_numpy(ids.astype(np.int64)), [ids.size])
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    info = read_index(tmp_path / "ours.idx")
    assert info.document_indices.tolist() == list(range(31))


def test_no_eod_and_multiple_inputs_in_order(tmp_path, tokenizer_path, tokenizer):
    a, b = make_docs(7, seed=1), make_docs(5, seed=2)
    write_jsonl(tmp_path / "a.jsonl", a)
    write_parquet(tmp_path / "b.parquet", b)
    preprocess([str(tmp_path / "*.*")], tmp_path / "out", str(tokenizer_path), append_eod=False, progress=False)
    out = read_documents(tmp_path / "out")
    assert [tokenizer.decode(d.tolist()) for d in out] == a + b  # sorted file order: a.jsonl then b.parquet


def test_stream_of_documents(tmp_path, tokenizer_path, tokenizer):
    """The path Hugging Face streaming uses: an iterable of rows, cut into shards of docs_per_shard."""
    docs = make_docs(25, seed=4)
    rows = ({"text": d} for d in docs)
    stats = preprocess(None, tmp_path / "s", str(tokenizer_path), documents=rows, docs_per_shard=7, progress=False)
    assert stats["shards"] == 4
    assert [tokenizer.decode(d[:-1].tolist()) for d in read_documents(tmp_path / "s")] == docs


def test_refuses_to_overwrite(tmp_path, tokenizer_path):
    src = str(write_jsonl(tmp_path / "in.jsonl", make_docs(3)))
    preprocess([src], tmp_path / "out", str(tokenizer_path), progress=False)
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess([src], tmp_path / "out", str(tokenizer_path), progress=False)
    preprocess([src], tmp_path / "out", str(tokenizer_path), progress=False, overwrite=True)
