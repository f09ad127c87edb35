"""Inputs that would make an empty or unusable dataset, and unusable output paths or tokenizers: one `error:` line
naming the file (and flag), exit code 2, no traceback, nothing written. Empty documents are skipped and counted."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from preprocess_helpers import make_docs, read_documents, write_jsonl

from transxssm_preprocess import preprocess
from transxssm_preprocess.cli import main
from transxssm_preprocess.sources import InputError


def _run(src, prefix, tokenizer, *extra) -> int:
    return main(["run", "--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
                 "--workers", "1", "--no-progress", *extra])


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _nothing_written(prefix: Path) -> bool:
    return not any(Path(f"{prefix}{suffix}").exists() for suffix in (".bin", ".idx", ".stats.json", ".work"))


def test_empty_jsonl_is_an_error_naming_the_input(tmp_path, tokenizer_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    assert _run(src, tmp_path / "out", tokenizer_path) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--input {src}: no documents to write (0 empty skipped, 0 bad skipped)" in line, line
    assert _nothing_written(tmp_path / "out")


def test_whitespace_documents_are_skipped_and_counted(tmp_path, tokenizer_path, tokenizer, capsys):
    good = make_docs(5, seed=11, words=(5, 40))
    src = write_jsonl(tmp_path / "in.jsonl", [good[0], "", good[1], "  \n\t ", good[2], "\u3000", *good[3:]])
    assert _run(src, tmp_path / "out", tokenizer_path) == 0
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert (stats["documents"], stats["empty_skipped"], stats["skipped"]) == (5, 3, {})
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"5 documents written, {stats['tokens']:,} tokens, 3 empty skipped, 0 bad skipped" in summary), summary
    assert [tokenizer.decode(d[:-1].tolist()) for d in read_documents(tmp_path / "out")] == good
    assert main(["validate", str(tmp_path / "out"), "--tokenizer", str(tokenizer_path)]) == 0


def test_only_empty_documents_is_an_error(tmp_path, tokenizer_path, capsys):
    src = write_jsonl(tmp_path / "blank.jsonl", ["", " ", "\n\n"])
    assert _run(src, tmp_path / "out", tokenizer_path) == 2
    line = _error_line(capsys.readouterr().err)
    assert "(3 empty skipped, 0 bad skipped): every document is empty or whitespace-only" in line, line
    assert _nothing_written(tmp_path / "out")


def test_skip_bad_with_nothing_usable_reports_the_counts_and_fails(tmp_path, tokenizer_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "unterminated\n["a list"]\n{"text": ""}\n{"content": "wrong key"}\n')
    assert _run(src, tmp_path / "out", tokenizer_path) == 2  # without --skip-bad: the first bad line
    assert f"{src}:line 1: the line is not valid JSON" in _error_line(capsys.readouterr().err)
    assert _run(src, tmp_path / "out", tokenizer_path, "--skip-bad") == 2
    line = _error_line(capsys.readouterr().err)
    assert (f"--input {src}: no documents to write (1 empty skipped, 3 bad skipped (malformed_json 2, "
            "missing_text_column 1))" in line), line
    assert _nothing_written(tmp_path / "out")


def test_stream_without_documents_is_an_error(tmp_path, tokenizer_path):
    with pytest.raises(InputError, match=r"^my-stream: no documents to write \(2 empty skipped"):
        preprocess(None, tmp_path / "out", str(tokenizer_path), documents=iter(["", {"text": "  "}]),
                   documents_name="my-stream", progress=False)
    assert _nothing_written(tmp_path / "out")


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (as root, permission bits do not stop it: use /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if os.access("/sys", os.F_OK) and not _can_create_in(Path("/sys")):
        return Path("/sys")
    pytest.skip("running as root with no read-only folder to try")


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".transxssm-probe").touch()
    except OSError:
        return False
    (folder / ".transxssm-probe").unlink()
    return True


def test_unwritable_output_folder(tmp_path, tokenizer_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(3, seed=12))
    prefix = _unwritable_folder(tmp_path) / "out"
    assert _run(src, prefix, tokenizer_path) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --output-prefix {prefix}: cannot write in {prefix.parent}"), line


def test_output_folder_that_cannot_be_created(tmp_path, tokenizer_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(3, seed=12))
    (tmp_path / "a-file").write_text("not a folder")
    prefix = tmp_path / "a-file" / "data" / "out"
    assert _run(src, prefix, tokenizer_path) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --output-prefix {prefix}: cannot create the folder {prefix.parent}"), line


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b'{"not": "a tokenizer"}', b"[1, 2"],
                         ids=["random_bytes", "other_json", "broken_json"])
def test_invalid_tokenizer_file_names_the_flag_and_the_file(tmp_path, content, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(3, seed=13))
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    assert _run(src, tmp_path / "out", bad) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --tokenizer {bad}: not a tokenizer file"), line
    assert _nothing_written(tmp_path / "out")
    assert main(["validate", str(tmp_path / "out"), "--tokenizer", str(bad)]) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: --tokenizer {bad}: not a tokenizer file")
