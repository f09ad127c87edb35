"""Output bytes do not depend on the worker count; a killed run resumes to the same bytes without redoing shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from preprocess_helpers import make_docs, write_jsonl, write_parquet

from transxssm_preprocess import preprocess


def _corpus(tmp_path: Path) -> list[str]:
    write_jsonl(tmp_path / "a.jsonl", make_docs(300, seed=11))
    write_parquet(tmp_path / "b.parquet", make_docs(200, seed=12), row_group_size=40)
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]


def test_identical_bytes_for_1_and_2_workers(tmp_path, tokenizer_path):
    inputs = _corpus(tmp_path)
    # ~0.03 MB shards: several byte-range shards of the jsonl file and row-range shards of the parquet file.
    one = preprocess(inputs, tmp_path / "w1", str(tokenizer_path), workers=1, shard_mb=0.03, progress=False)
    two = preprocess(inputs, tmp_path / "w2", str(tokenizer_path), workers=2, shard_mb=0.03, progress=False)
    assert one["shards"] == two["shards"] >= 6
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert one["documents"] == two["documents"] == 500
    # Shards split jsonl lines and parquet rows without losing or repeating any: same as one big shard.
    whole = preprocess(inputs, tmp_path / "w0", str(tokenizer_path), workers=1, shard_mb=64, progress=False)
    assert whole["shards"] == 2
    assert (tmp_path / "w0.bin").read_bytes() == (tmp_path / "w1.bin").read_bytes()


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tokenizer_path):
    # Enough shards that the run is still going when the first ones are complete.
    write_jsonl(tmp_path / "big.jsonl", make_docs(1200, seed=21, words=(30, 300)))
    args = ["--input", str(tmp_path / "big.jsonl"), "--tokenizer", str(tokenizer_path), "--shard-mb", "0.04",
            "--no-progress"]
    cli = [sys.executable, "-m", "transxssm_preprocess.cli", "run"]
    work = tmp_path / "killed.work"
    proc = subprocess.Popen(cli + args + ["--output-prefix", str(tmp_path / "killed"), "--workers", "2"],
                            start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(work.glob("shard-*.json"))) < 2:
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no shard completed within 60 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, as a crash or OOM kill would
    proc.wait()
    done_before = {p.name for p in work.glob("shard-*.json")}
    plan_shards = len(__import__("json").loads((work / "plan.json").read_text())["shards"])
    assert 2 <= len(done_before) < plan_shards, "the kill must land mid-run"
    assert not (tmp_path / "killed.bin").exists() and not (tmp_path / "killed.idx").exists()

    resumed = subprocess.run(cli + args + ["--output-prefix", str(tmp_path / "killed"), "--workers", "2"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    stats = __import__("json").loads((tmp_path / "killed.stats.json").read_text())
    assert stats["shards_resumed"] >= len(done_before)  # completed shards were not redone

    preprocess([str(tmp_path / "big.jsonl")], tmp_path / "clean", str(tokenizer_path), shard_mb=0.04,
               progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"killed{suffix}").read_bytes() == (tmp_path / f"clean{suffix}").read_bytes()
    assert not work.exists()
