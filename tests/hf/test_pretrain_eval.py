"""bench/pretrain_eval.py end to end on CPU (slow: about 5 minutes on 2 cores): a corpus from the repository's own
docs, a tiny model trained 3 steps, converted, evaluated on every paper task (2 items each), three generations and
a NIAH grid, each stage through the real CLI, in two invocations
(--stages)."""

import json
import subprocess
import sys

import pytest

from hf_cases import REPO

pytestmark = pytest.mark.slow


def test_pretrain_eval_runs_every_stage(tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(REPO / "bench" / "package_corpus.py"), "--out", str(corpus), "--roots",
                    str(REPO / "docs"), str(REPO / "launch"), "--valid-fraction", "0.2", "--workers", "2"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    out, common = tmp_path / "out", ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    train = subprocess.run([sys.executable, str(REPO / "bench" / "pretrain_eval.py"), *common, "--data",
                            str(corpus / "train"), "--config", "configs/tiny.yaml", "--steps", "3", "--global-batch",
                            "2", "--micro-batch", "1", "--seq-length", "128", "--stages", "train,convert"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    # the rest in a second invocation, as on a machine lent for one command at a time: the record carries over
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pretrain_eval.py"), *common, "--limit", "2",
                           "--niah-lengths", "256", "--stages", "eval,generate,niah"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "pretrain-eval.json").read_text())
    assert [s["name"] for s in result["stages"]] == ["train", "convert", "eval", "generate", "generate", "generate",
                                                     "niah"]
    assert result["train"]["steps"] == 3 and result["train"]["tokens"] == 3 * 2 * 128
    scores = result["eval"]["scores"]
    assert set(scores) == {"MMLU", "TriviaQA", "PIQA", "HellaSwag", "OBQA", "Winogrande", "ARC-E", "ARC-C", "ARC",
                           "Avg"}
    assert all(0 <= v <= 100 for v in scores.values())
    for g in result["generations"]:
        assert g["text"].startswith(g["prompt"]) and len(g["text"]) > len(g["prompt"])
    assert result["niah"]["lengths"] == [256] and len(result["niah"]["accuracy"][0]) == 5
    assert (out / "table.md").read_text().startswith("| Model |") and (out / "niah.png").stat().st_size > 0
