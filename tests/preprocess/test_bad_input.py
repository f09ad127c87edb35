"""Bad input: a clear error naming the file and line/row, or (with skip_bad) skipped and counted; never a dataset.
Empty documents are not bad input: they are always skipped and counted."""

from __future__ import annotations

import json

import pytest
from preprocess_helpers import make_docs, read_documents, write_jsonl, write_parquet

from transxssm_preprocess import preprocess
from transxssm_preprocess.pipeline import BadInputError
from transxssm_preprocess.sources import InputError

GOOD = make_docs(4, seed=5, words=(5, 60))  # all well under max_doc_chars=1000

# name -> (raw JSONL line, reason counted with skip_bad, words the error message must contain)
JSONL_CASES = {
    "malformed_json": (b'{"text": "unterminated\n', "malformed_json", "not valid JSON"),
    "not_an_object": (b'["text", "in a list"]\n', "malformed_json", "not an object"),
    "missing_text": (b'{"content": "wrong key"}\n', "missing_text_column", "text column is absent"),
    "null_text": (b'{"text": null}\n', "null_text", "null"),
    "number_text": (b'{"text": 42}\n', "not_a_string", "not a string"),
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}\n', "invalid_utf8", "UTF-8"),
    "lone_surrogate": (b'{"text": "bad \\ud800 escape"}\n', "invalid_utf8", "UTF-8"),
    "gigantic": (json.dumps({"text": "x" * 5000}).encode() + b"\n", "too_long", "--max-doc-chars"),
}


def _jsonl_with_bad_line(path, bad_line: bytes):
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in GOOD]
    path.write_bytes(b"".join(lines[:2]) + bad_line + b"".join(lines[2:]))  # the bad document is on line 3
    return path


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_bad_line_error_then_skip(tmp_path, tokenizer_path, tokenizer, case):
    bad_line, reason, words = JSONL_CASES[case]
    src = _jsonl_with_bad_line(tmp_path / "in.jsonl", bad_line)
    with pytest.raises(BadInputError) as err:
        preprocess([str(src)], tmp_path / "out", str(tokenizer_path), max_doc_chars=1000, progress=False)
    message = str(err.value)
    assert f"{src}:line 3" in message and words in message and "--skip-bad" in message
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()

    stats = preprocess([str(src)], tmp_path / "out", str(tokenizer_path), max_doc_chars=1000, skip_bad=True,
                       progress=False)
    assert stats["skipped"] == {reason: 1} and stats["documents"] == len(GOOD) and stats["empty_skipped"] == 0
    assert stats["skipped_examples"] == [f"{src}:line 3: {reason}"]
    assert [tokenizer.decode(d[:-1].tolist()) for d in read_documents(tmp_path / "out")] == GOOD


def test_parquet_null_empty_and_long_rows(tmp_path, tokenizer_path):
    rows = [GOOD[0], None, GOOD[1], "", "y" * 3000, GOOD[2]]
    src = write_parquet(tmp_path / "in.parquet", rows, row_group_size=2)
    with pytest.raises(BadInputError, match=r"in\.parquet:row 1: the text value is null"):
        preprocess([str(src)], tmp_path / "out", str(tokenizer_path), max_doc_chars=1000, progress=False)
    stats = preprocess([str(src)], tmp_path / "out", str(tokenizer_path), max_doc_chars=1000, skip_bad=True,
                       progress=False)
    assert stats["skipped"] == {"null_text": 1, "too_long": 1} and stats["documents"] == 3
    assert stats["empty_skipped"] == 1  # the "" row: skipped and counted, never bad input
    assert stats["skipped_examples"][1] == f"{src}:row 4: too_long"


def test_parquet_missing_text_column(tmp_path, tokenizer_path):
    good = write_parquet(tmp_path / "a.parquet", GOOD)
    bad = write_parquet(tmp_path / "b.parquet", GOOD, key="content")
    with pytest.raises(InputError, match=r"b\.parquet: no column 'text' \(columns: content, n\)"):
        preprocess([str(good), str(bad)], tmp_path / "out", str(tokenizer_path), progress=False)
    stats = preprocess([str(good), str(bad)], tmp_path / "out", str(tokenizer_path), skip_bad=True, progress=False)
    assert stats["documents"] == len(GOOD) and "b.parquet: no column 'text'" in stats["skipped_files"][0]
    # --text-column picks the column
    stats = preprocess([str(bad)], tmp_path / "c", str(tokenizer_path), text_column="content", progress=False)
    assert stats["documents"] == len(GOOD)


def test_error_in_worker_process_names_the_exact_line(tmp_path, tokenizer_path):
    """With several byte-range shards and 2 workers, the message still carries the true line number."""
    docs = make_docs(400, seed=8)
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in docs]
    lines[350] = b"{not json}\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines))
    with pytest.raises(BadInputError, match=r"in\.jsonl:line 351: the line is not valid JSON"):
        preprocess([str(src)], tmp_path / "out", str(tokenizer_path), workers=2, shard_mb=0.02, progress=False)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_missing_and_unsupported_inputs(tmp_path, tokenizer_path):
    with pytest.raises(InputError, match="no such file or folder"):
        preprocess([str(tmp_path / "nope.jsonl")], tmp_path / "out", str(tokenizer_path), progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type"):
        preprocess([str(tmp_path / "notes.txt")], tmp_path / "out", str(tokenizer_path), progress=False)
    with pytest.raises(InputError, match="matches no file"):
        preprocess([str(tmp_path / "*.parquet")], tmp_path / "out", str(tokenizer_path), progress=False)
    with pytest.raises(ValueError, match="no such file"):
        preprocess([str(write_jsonl(tmp_path / "a.jsonl", GOOD))], tmp_path / "out", str(tmp_path / "tok.json"),
                   progress=False)


def test_changed_inputs_do_not_resume_a_stale_partial_run(tmp_path, tokenizer_path):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    (tmp_path / "out.work").mkdir()
    (tmp_path / "out.work" / "plan.json").write_text(json.dumps({"fingerprint": "another run"}))
    with pytest.raises(InputError, match="--restart"):
        preprocess([str(src)], tmp_path / "out", str(tokenizer_path), progress=False)
    stats = preprocess([str(src)], tmp_path / "out", str(tokenizer_path), restart=True, progress=False)
    assert stats["documents"] == len(GOOD)


def test_python_edu_hub_parquet_without_text_says_how_to_get_it(tmp_path, tokenizer_path):
    """The hub's python-edu files hold blob ids only; the error points at the download recipe."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "python-edu.parquet"
    pq.write_table(pa.table({"blob_id": ["a" * 40], "repo_name": ["x/y"], "path": ["m.py"], "length_bytes": [10],
                             "score": [4.1], "int_score": [4]}), src)
    with pytest.raises(InputError, match=r"python-edu parquet holds only blob ids.*docs/preprocess\.md"):
        preprocess([str(src)], tmp_path / "out", str(tokenizer_path), progress=False)
