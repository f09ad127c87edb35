"""bench/inference.py end to end on CPU: tiny models, every row measured, and the cached decode loop of both models
giving exactly the greedy tokens of a full forward."""

import json
import os
import subprocess
import sys

from hf_cases import REPO


def test_inference_bench_measures_every_case_and_decodes_greedily(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "inference.py"), "--device", "cpu", "--tiny", "--contexts", "64",
           "--batches", "1,2", "--decode-tokens", "4", "--repeats", "1", "--check", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "inference-speed.json").read_text())

    rows = result["rows"]
    assert [(r["model"], r["context"], r["batch"]) for r in rows] == [
        (m, 64, b) for b in (1, 2) for m in ("transxssm", "transformer")]
    for r in rows:
        assert r["error"] is None, r
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step", "cache_bytes_per_sequence"):
            assert r[key] > 0, (key, r)
    assert all(r["ssd_path"] for r in rows if r["model"] == "transxssm")
    # The first case of each model is checked: the loop's tokens are the argmax of a full forward.
    assert [r["check_ok"] for r in rows] == [True, True, None, None]
    assert [r["check_agreement"] for r in rows] == [1.0, 1.0, None, None]
    # An SS layer's state does not grow with the context; the transformer's KV does: per sequence, less cache.
    by_model = {r["model"]: r["cache_bytes_per_sequence"] for r in rows if r["batch"] == 1}
    assert by_model["transxssm"] < by_model["transformer"]
    assert {(r["context"], r["batch"]) for r in result["ratios"]} == {(64, 1), (64, 2)}
    assert result["commit"] and result["command"].endswith(str(tmp_path))
