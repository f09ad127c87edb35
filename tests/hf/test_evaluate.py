"""lm-eval end to end, offline, on a random-initialised small export: offline task YAMLs over .assets/eval, the
paper's metrics, the Table 3 layout, and scores that do not depend on the batch size (right padding for
log-likelihoods, left padding for TriviaQA's generation)."""

import json

import pytest
from hf_cases import EVAL_ASSETS

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.skipif(not EVAL_ASSETS.is_dir(), reason="no offline asset bundle (.assets/eval)")


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))  # datasets' arrow cache


def test_offline_tasks_include_lm_evals_own_task_files(tmp_path):
    import yaml

    from transxssm_megatron.hf.offline_tasks import write_offline_tasks

    names = write_offline_tasks(EVAL_ASSETS, tmp_path, ["hellaswag", "mmlu"])
    assert names == {"hellaswag": "offline_hellaswag", "mmlu": "offline_mmlu"}
    hellaswag = yaml.safe_load((tmp_path / "offline_hellaswag.yaml").read_text())
    assert hellaswag["include"].endswith("lm_eval/tasks/hellaswag/hellaswag.yaml")
    assert hellaswag["dataset_path"] == "arrow" and hellaswag["dataset_kwargs"]["data_files"]["validation"].endswith(
        ".arrow")
    assert len(yaml.safe_load((tmp_path / "offline_mmlu.yaml").read_text())["task"]) == 57


def test_eval_runs_offline_end_to_end(tiny_export, tmp_path):
    """All eight paper tasks, two items each (MMLU: per subject), zero network."""
    from transxssm_megatron.hf.evaluate import PAPER_TASKS, evaluate

    summary = evaluate(tiny_export, tasks=PAPER_TASKS, offline_assets=EVAL_ASSETS, limit=2, batch_size=8,
                       max_gen_toks=8, device="cpu", out=tmp_path)
    scores = summary["scores"]
    for title in ("MMLU", "TriviaQA", "PIQA", "HellaSwag", "OBQA", "Winogrande", "ARC-E", "ARC-C", "Avg"):
        assert 0.0 <= scores[title] <= 100.0, title
    assert "acc_norm,none" in summary["results"]["offline_hellaswag"] and "acc,none" in summary["results"]["offline_mmlu"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"]["arc_easy"] == "offline_arc_easy" and saved["n-samples"]["offline_piqa"]["effective"] == 2
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| Model | MMLU | TriviaQA | PIQA | HellaSwag | OBQA | Winogrande | ARC-E | ARC-C | Avg |")
    assert f"| {tiny_export.name} (ours) |" in table and "| TransXSSM 1.3B (paper) |" in table and "52.44" in table


def test_scores_do_not_depend_on_batch_size(tiny_export):
    from transxssm_megatron.hf.evaluate import evaluate

    runs = [evaluate(tiny_export, tasks=["arc_easy", "winogrande", "triviaqa"], offline_assets=EVAL_ASSETS, limit=5,
                     batch_size=size, max_gen_toks=6, device="cpu") for size in (1, 5)]
    assert runs[0]["scores"] == runs[1]["scores"]
    for task in ("offline_arc_easy", "offline_winogrande"):  # log-likelihood tasks: the same numbers
        assert runs[0]["results"][task]["acc,none"] == runs[1]["results"][task]["acc,none"]
