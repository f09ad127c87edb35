"""bench/ablation.py end to end on CPU: a tiny corpus from bench/package_corpus.py, tiny models, a few steps; every
requested run trained and validated on the held-out files, the variants differing only where the ablation says."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from transxssm_preprocess.indexed import read_index

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"
TINY = ["--steps", "3", "--seq-length", "64", "--layers", "8", "--hidden", "64", "--heads", "2", "--state-size", "32",
        "--micro-batch", "2", "--global-batch", "2", "--eval-iters", "1", "--device", "cpu"]
SS_OPTIONS = ("ss_positional", "ss_conv1d", "ss_d_skip", "ss_z_gate", "ss_dt_bias")
_WORDS = ("the model reads a token and writes the next one while the state keeps what came before in a decaying sum "
          "over positions of keys and values so that a reader can follow each step").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 short text files -> OUT/train.bin/.idx and OUT/valid.bin/.idx (a quarter of the files held out)."""
    if not TOKENIZER.is_file():
        pytest.fail(f"{TOKENIZER} is missing: run `bash scripts/setup.sh` before the tests", pytrace=False)
    root = tmp_path_factory.mktemp("ablation")
    for i in range(40):
        rng = random.Random(i)
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(30)]
        (root / "src" / f"note_{i:02d}.txt").parent.mkdir(exist_ok=True)
        (root / "src" / f"note_{i:02d}.txt").write_text(f"Note {i}\n\n" + "\n".join(lines) + "\n")
    cmd = [sys.executable, str(REPO / "bench" / "package_corpus.py"), "--out", str(root / "corpus"), "--roots",
           str(root / "src"), "--valid-fraction", "0.25", "--workers", "1", "--tokenizer", str(TOKENIZER)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "corpus"


def _ablation(corpus: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "ablation.py"), "--data", str(corpus), "--out", str(out), *TINY,
           *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "order, paper:" in proc.stdout
    return json.loads((out / "ablation.json").read_text())


def _check_runs(result: dict, expected: list[tuple[str, int]]) -> None:
    assert [(r["config"], r["seed"]) for r in result["runs"]] == expected
    for r in result["runs"]:
        assert r["exit_code"] == 0 and r["status"] == "finished", r.get("error")
        assert [p["step"] for p in r["val_curve"]] == [1, 2, 3]
        assert all(math.isfinite(p["val_loss"]) and p["val_ppl"] > 1 for p in r["val_curve"])
        assert r["final_val_ppl"] == r["val_curve"][-1]["val_ppl"] and r["tokens_seen"] == 3 * 2 * 64
        assert r["tokens_per_s"] > 0 and f"train.seed={r['seed']}" in r["command"]


@pytest.fixture(scope="module")
def two_configs(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("two_configs")
    return out, _ablation(corpus, out, "--configs", "ss-conv1d_d,hybrid-rope")


def test_ablation_trains_each_config_on_held_out_validation(corpus, two_configs):
    tmp_path, result = two_configs
    # The first seed's set runs the headline comparison first.
    _check_runs(result, [("hybrid-rope", 0), ("ss-conv1d_d", 0)])
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    assert {s["config"] for s in result["summary"]} == {"ss-conv1d_d", "hybrid-rope"}
    assert result["commit"] and result["command"] and result["settings"]["steps"] == 3

    # Every run trains on train.bin and validates on the held-out files of valid.bin.
    for r in result["runs"]:
        assert f"data.prefixes=[{corpus / 'train'}]" in r["command"]
        assert f"data.valid_prefixes=[{corpus / 'valid'}]" in r["command"]
    assert result["settings"]["data"]["valid"]["documents"] == len(read_index(corpus / "valid.idx").sequence_lengths)

    # The variants: the three SS ones differ only in the positional mechanism (conv1d and D come with conv1d_d, never
    # a z gate or dt_bias), the hybrid only in its layer pattern, attention-only has no SS layer.
    configs = result["configs"]
    assert set(configs) == {"ss-conv1d_d", "ss-none", "ss-rope", "hybrid-conv1d_d", "hybrid-none", "hybrid-rope",
                            "attention-only"}
    for kind, layers in (("ss", ["ss"] * 8), ("hybrid", ["ss"] * 7 + ["sa"])):
        models = {mode: configs[f"{kind}-{mode}"]["model"] for mode in ("conv1d_d", "none", "rope")}
        for mode, model in models.items():
            assert {k: model[k] for k in SS_OPTIONS} == {
                "ss_positional": mode, "ss_conv1d": mode == "conv1d_d", "ss_d_skip": mode == "conv1d_d",
                "ss_z_gate": False, "ss_dt_bias": False}
            assert configs[f"{kind}-{mode}"]["layer_kinds"] == layers
            assert {k: v for k, v in model.items() if k not in SS_OPTIONS} == \
                {k: v for k, v in models["rope"].items() if k not in SS_OPTIONS}
    for mode in ("conv1d_d", "none", "rope"):
        ss, hybrid = configs[f"ss-{mode}"]["model"], configs[f"hybrid-{mode}"]["model"]
        assert {k: v for k, v in ss.items() if k != "architecture"} == \
            {k: v for k, v in hybrid.items() if k != "architecture"}
    assert configs["attention-only"]["layer_kinds"] == ["sa"] * 8


def test_ablation_parallel_runs_give_the_same_perplexities(corpus, two_configs, tmp_path):
    """--parallel 2: both runs at once, each with its own index cache; on CPU (fp32, deterministic) every validation
    loss equals the one-at-a-time runs' exactly."""
    _, one_at_a_time = two_configs
    result = _ablation(corpus, tmp_path, "--configs", "ss-conv1d_d,hybrid-rope", "--parallel", "2")
    assert sorted((r["config"], r["seed"], r["parallel"]) for r in result["runs"]) == \
        [("hybrid-rope", 0, 2), ("ss-conv1d_d", 0, 2)]
    before = {r["config"]: r["val_curve"] for r in one_at_a_time["runs"]}
    for r in result["runs"]:
        assert r["status"] == "finished" and r["val_curve"] == before[r["config"]]
    assert sorted(p.name for p in (tmp_path / "data" / "cache").iterdir()) == ["hybrid-rope-seed0", "ss-conv1d_d-seed0"]


@pytest.mark.slow
def test_ablation_second_invocation_adds_seeds(corpus, tmp_path):
    """Three configs with seeds 0 and 1 (the second only for the extra-seed configs), then a second invocation with
    seed 2 into the same folder: one table over all, the finished runs not run again."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = _ablation(corpus, out, "--configs", "ss-none,hybrid-rope,attention-only", "--seeds", "0,1", "--work",
                       str(work))
    first = [("hybrid-rope", 0), ("attention-only", 0), ("ss-none", 0), ("hybrid-rope", 1), ("attention-only", 1)]
    _check_runs(result, first)
    assert (work / "cache").is_dir() and not (out / "data").exists()
    result = _ablation(corpus, out, "--configs", "hybrid-rope,ss-none", "--seeds", "0,2", "--work", str(work))
    _check_runs(result, first + [("hybrid-rope", 2)])
    summary = {s["config"]: s for s in result["summary"]}
    assert summary["hybrid-rope"]["seeds"] == [0, 1, 2] and summary["hybrid-rope"]["std_ppl"] > 0
    assert len(result["invocations"]) == 2


def _run(config: str, seed: int, losses: list[float], status: str) -> dict:
    curve = [{"step": 10 * (i + 1), "tokens": 10 * (i + 1) * 128, "val_loss": v, "val_ppl": math.exp(v)}
             for i, v in enumerate(losses)]
    return {"config": config, "seed": seed, "status": status, "exit_code": 0, "val_curve": curve,
            "final_val_ppl": curve[-1]["val_ppl"], "tokens_per_s": 1000.0, "tokens_seen": curve[-1]["tokens"]}


def test_ablation_report_compares_runs_cut_short_at_the_step_all_reached(tmp_path):
    """--report on a record where one run stopped early (time limit): the summary keeps each final perplexity and
    adds the mean at the last validation step every run reached, so the early run is ranked on equal tokens."""
    runs = [_run("hybrid-rope", 0, [5.0, 4.0], "time_limit"),
            _run("ss-none", 0, [5.2, 4.2, 3.5], "finished"), _run("ss-none", 1, [5.1, 4.4, 3.6], "finished")]
    record = {"settings": {"hidden": 64, "layers": 8, "seq_length": 64, "steps": 30, "global_batch": 2},
              "runs": runs, "summary": []}
    (tmp_path / "ablation.json").write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ablation.py"), "--out", str(tmp_path), "--report"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = {s["config"]: s for s in json.loads((tmp_path / "ablation.json").read_text())["summary"]}
    assert summary["ss-none"]["common_step"] == 20 and summary["hybrid-rope"]["common_step"] == 20
    assert summary["ss-none"]["mean_ppl"] == pytest.approx((math.exp(3.5) + math.exp(3.6)) / 2)
    assert summary["ss-none"]["mean_ppl_at_common_step"] == pytest.approx((math.exp(4.2) + math.exp(4.4)) / 2)
    assert summary["hybrid-rope"]["mean_ppl_at_common_step"] == pytest.approx(math.exp(4.0))
    assert not summary["hybrid-rope"]["all_finished"] and summary["ss-none"]["all_finished"]
    # finally ss-none looks better; at step 20, on the same tokens, hybrid-rope is
    assert "order, ours (final):        ss-none < hybrid-rope" in proc.stdout
    assert "order, ours (at step 20): hybrid-rope < ss-none" in proc.stdout
    assert (tmp_path / "ablation.png").stat().st_size > 10_000

    missing = subprocess.run([sys.executable, str(REPO / "bench" / "ablation.py"), "--out", str(tmp_path / "none"),
                              "--report"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --report: no ")
    assert len(missing.stderr.strip().splitlines()) == 1
