"""The wandb sink of MetricsWriter, against a stand-in `wandb` module (the package is optional and never
installed by the tests; no network): what it is given, and one wandb run per run dir across resumes."""

import json
import sys
import types
from pathlib import Path

from transxssm_megatron.training.metrics import MetricsWriter
from transxssm_megatron.training.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs

    def log(self, data, step):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls, kwargs)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def config(run_dir):
    return RunConfig.load(REPO / "configs/tiny.yaml", [f"logging.run_dir={run_dir}", "logging.wandb=true",
                                                       "logging.wandb_project=proj", "logging.tensorboard=false"])


def test_records_go_to_wandb_and_a_resume_reuses_the_run(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    cfg = config(tmp_path / "run")
    writer = MetricsWriter(cfg.run_dir, cfg, print_fn=lambda *a: None)
    writer.write({"step": 10, "loss": 5.5, "lr": 1e-3}, console=False)
    writer.close()
    (_, init), (_, logged, step), (finish,) = calls
    assert init["project"] == "proj" and init["dir"] == str(cfg.run_dir) and init["resume"] == "allow"
    assert init["config"]["logging"]["wandb"] is True
    assert (logged, step, finish) == ({"loss": 5.5, "lr": 1e-3}, 10, "finish")
    assert json.loads((cfg.run_dir / "metrics.jsonl").read_text()) == {"step": 10, "loss": 5.5, "lr": 1e-3}

    calls.clear()
    MetricsWriter(cfg.run_dir, cfg, resume_step=10, print_fn=lambda *a: None).close()
    assert calls[0][1]["id"] == init["id"]          # the resumed job appends to the same wandb run
    other = config(tmp_path / "other")
    MetricsWriter(other.run_dir, other, print_fn=lambda *a: None).close()
    assert calls[2][1]["id"] != init["id"]          # a different run dir is a different wandb run


def test_wandb_not_installed_is_reported_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    messages = []
    cfg = config(tmp_path / "run")
    writer = MetricsWriter(cfg.run_dir, cfg, print_fn=messages.append)
    writer.write({"step": 1, "loss": 2.0}, console=False)
    writer.close()
    assert writer.wandb is None
    assert any("wandb is not installed" in m for m in messages)
