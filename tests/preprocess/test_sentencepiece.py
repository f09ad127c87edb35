"""SentencePiece `.model` tokenizers (Llama / Mistral style) in `transxssm-preprocess run` and `validate`.

A BPE model of 200 pieces (unk 0, bos 1, eos 2, as Llama numbers them) is trained in the test on ~20 KB of the
sample corpus; documents go through `run` (in the main process and in two workers) and come back from the
.bin/.idx as exactly the ids SentencePiece gives, each followed by the model's EOS and never preceded by a BOS.
Bad `.model` files get the one-line errors of bad tokenizer.json files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import REPO
from preprocess_helpers import make_docs, read_documents, write_jsonl

from transxssm_preprocess.cli import main

sentencepiece = pytest.importorskip("sentencepiece")

SAMPLE = REPO / ".assets" / "sample" / "fineweb-edu-dedup" / "train-00000-of-00002.parquet"


def _sample_texts(n_bytes: int) -> list[str]:
    import pyarrow.parquet as pq

    if not SAMPLE.is_file():
        pytest.fail(f"{SAMPLE} is missing: run `bash scripts/setup.sh` before the tests", pytrace=False)
    texts, total = [], 0
    for text in pq.read_table(SAMPLE, columns=["text"]).column("text").to_pylist():
        texts.append(text[:4000])
        total += len(texts[-1])
        if total >= n_bytes:
            return texts
    return texts


def _train(path: Path, **options) -> Path:
    options = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, **options}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for text in _sample_texts(20_000) for line in text.splitlines() if line),
        model_prefix=str(path.with_suffix("")), vocab_size=200, model_type="bpe", character_coverage=1.0,
        num_threads=1, minloglevel=2, **options)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("sp") / "tokenizer.model")


def _run(src, prefix, tokenizer, *extra) -> int:
    return main(["run", "--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
                 "--no-progress", *extra])


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _documents() -> list[str]:
    """Sample prose, unicode the model never saw (unk ids), whitespace at the edges, literal `</s>`."""
    return _sample_texts(6_000)[:8] + make_docs(30, seed=5) + ["  a </s> b <s>\n", "x"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_documents_round_trip_with_the_models_ids_and_eos(tmp_path, sp_model, workers, capsys):
    docs = _documents()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert _run(src, tmp_path / "out", sp_model, "--workers", workers, "--shard-mb", "0.01") == 0
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    expected = [ids + [2] for ids in processor.encode(docs, out_type=int)]
    assert [d.tolist() for d in read_documents(tmp_path / "out")] == expected
    assert all(d[0] != 1 for d in expected)  # no BOS

    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["tokenizer"]["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()
    assert (stats["tokenizer"]["vocab_size"], stats["tokenizer"]["eod_id"]) == (200, 2)
    assert main(["validate", str(tmp_path / "out"), "--tokenizer", str(sp_model)]) == 0
    capsys.readouterr()


def test_folder_with_tokenizer_model_and_other_eod_pieces(tmp_path, sp_model):
    from transxssm_preprocess.tokenizer import resolve_tokenizer

    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    info = resolve_tokenizer(str(folder))
    assert (info.kind, info.vocab_size, info.eod_id, info.eod_token) == ("sentencepiece", 200, 2, "</s>")
    assert resolve_tokenizer(str(sp_model), eod_token="<s>").eod_id == 1  # a named piece of the model
    assert resolve_tokenizer(str(sp_model), eod_token=None).eod_id is None


def test_bad_model_files_get_one_line_errors(tmp_path, sp_model, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", ["one document"])
    cases = {"random.model": random.Random(0).randbytes(4096),
             "json.model": (REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json").read_bytes()[:4096]}
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        assert _run(src, tmp_path / "out", bad) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"error: --tokenizer {bad}: not a SentencePiece model ("), line
        assert line.endswith("expected a SentencePiece model file such as the tokenizer.model of a Llama or "
                             "Mistral checkpoint"), line

    assert _run(src, tmp_path / "out", tmp_path / "missing.model") == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: --tokenizer {tmp_path / 'missing.model'}: no "
                                                           f"such file")

    assert _run(src, tmp_path / "out", sp_model, "--eod-token", "<|nope|>") == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: --tokenizer {sp_model}: the SentencePiece model has no '<|nope|>' piece; leave --eod-token at its "
        f"default for the model's end-of-sequence piece '</s>', or pass --no-eod")

    no_eos = _train(tmp_path / "no_eos.model", eos_id=-1)
    assert _run(src, tmp_path / "out", no_eos) == 2
    assert "the SentencePiece model has no end-of-sequence piece (eos_id -1)" in _error_line(capsys.readouterr().err)
    assert _run(src, tmp_path / "out", no_eos, "--no-eod") == 0
    assert not any(Path(tmp_path).glob("out.work"))
