"""The offline asset folder that setup.sh assembles: tokenizer, eval sets, sample corpus in SmolLM schemas."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from transxssm_preprocess.assets import build_assets
from transxssm_preprocess.sample import COSMOPEDIA_SCHEMA, FINEWEB_SCHEMA, PYTHON_EDU_SCHEMA, SUBSETS, build_sample

ASSETS = REPO / ".assets"


def test_asset_folder_complete_and_rerun_is_a_fast_no_op(tokenizer_path):
    summary = json.loads((ASSETS / "ASSETS.json").read_text())
    assert summary["tokenizer"]["vocab_size"] == 50_280 and summary["tokenizer"]["eod_id"] == 0
    start = time.monotonic()
    assert build_assets(ASSETS, quiet=True) == summary  # nothing downloaded or rewritten
    assert time.monotonic() - start < 2.0
    index = json.loads((ASSETS / "eval" / "INDEX.json").read_text())
    for task in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "winogrande", "triviaqa"):
        assert index[task]["rows"]["validation"] > 0
        assert (ASSETS / "eval" / task / "validation" / "data-00000-of-00001.arrow").is_file()
    assert index["arc_easy"]["rows"]["validation"] == 570 and index["hellaswag"]["rows"]["validation"] == 10_042
    assert sum(k.startswith("mmlu/") for k in index) == 57


def test_sample_schemas_and_size():
    schemas = {"cosmopedia-v2": COSMOPEDIA_SCHEMA, "fineweb-edu-dedup": FINEWEB_SCHEMA,
               "python-edu": PYTHON_EDU_SCHEMA}
    manifest = json.loads((ASSETS / "sample" / "MANIFEST.json").read_text())
    for subset in SUBSETS:
        files = sorted((ASSETS / "sample" / subset).glob("train-*.parquet"))
        assert len(files) == 2
        for f in files:
            table = pq.read_table(f)
            assert table.schema.names == schemas[subset].names
            assert all(isinstance(t, str) and t.strip() for t in table.column("text").to_pylist())
    python_edu = pq.read_table(ASSETS / "sample" / "python-edu" / "train-00000-of-00002.parquet")
    assert all(len(b) == 40 for b in python_edu.column("blob_id").to_pylist())
    # a few MB of text: over a million tokens, enough for a tiny model's few hundred steps of 16 x 256 tokens
    assert 3e6 < manifest["bytes"] < 2e7


@pytest.mark.slow  # rebuilds the whole sample: ~10 s of CPU
def test_sample_is_deterministic(tmp_path, tokenizer_path):
    manifest = json.loads((ASSETS / "sample" / "MANIFEST.json").read_text())
    again = build_sample(tmp_path, tokenizer_path=tokenizer_path)
    assert again == manifest
