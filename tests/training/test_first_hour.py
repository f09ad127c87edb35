"""What a new user meets in the first hour on a fresh clone: configs that work after the demo (or say what to run
first), overrides anywhere on the command line, help texts that match the code, `transxssm config` without a
file, keep_last=0, summaries that always print, no run dir left by a failed start, quiet third-party warnings,
and a metrics.jsonl whose resumed steps say which record wins."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from transxssm_megatron import cli
from transxssm_megatron.cli import main
from transxssm_megatron.config import ConfigError
from transxssm_megatron.training import demo
from transxssm_megatron.training.metrics import MetricsWriter, read_metrics
from transxssm_megatron.training.run_config import RunConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
ASSETS = REPO / ".assets"
TOKENIZER = ASSETS / "tokenizer" / "gpt-neox-20b.json"
# A CPU-sized tiny run on synthetic data: enough to reach the checks after the run dir exists, in seconds.
MOCK = ["data.mode=mock", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2",
        "logging.tensorboard=false"]


def _error_line(stderr: str) -> str:
    """The one `error:` line of a failed command; fails on a traceback or a second error."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def small_assets(tmp_path) -> Path:
    """An asset folder in the demo's layout with a few hundred tokens per subset (the real tokenizer)."""
    if not TOKENIZER.is_file():
        pytest.skip("offline assets missing: run `bash scripts/setup.sh`")
    assets = tmp_path / "assets"
    (assets / "tokenizer").mkdir(parents=True)
    (assets / "tokenizer" / TOKENIZER.name).symlink_to(TOKENIZER)
    for n, subset in enumerate(demo.SUBSETS):
        docs = [{"text": f"Document {i} of {subset}: " + " ".join(f"word{(i * 7 + j + n) % 97}" for j in range(60))}
                for i in range(40)]
        (assets / "sample" / subset).mkdir(parents=True)
        (assets / "sample" / subset / "part.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return assets


# ---------------------------------------------------------------------------------------------- 1. configs
def test_tiny_config_trains_on_what_the_demo_writes(small_assets, tmp_path, monkeypatch, capsys):
    from transxssm_megatron.training.data import check_data

    monkeypatch.chdir(tmp_path)
    # Before the demo: one line that says to run it.
    assert main(["train", "--config", TINY]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: data.prefixes: runs/demo/data/cosmopedia-v2 is the demo's data") and \
        "run `transxssm demo` first" in line, line
    assert not (tmp_path / "runs").exists()

    # After it (its tokenizing step, on a small sample): every prefix of tiny.yaml is there and sound.
    prefixes, _, _ = demo.preprocess_sample(small_assets, Path(demo.DEFAULT_OUT) / "data")
    cfg = RunConfig.load(TINY)
    assert cfg.data.prefixes == prefixes
    check_data(cfg)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_says_what_to_run_first(config, tmp_path, monkeypatch, capsys):
    header = (REPO / "configs" / config).read_text().split("\nmodel:")[0]
    assert "Run first" in header and ("transxssm demo" in header or "transxssm-preprocess run" in header)
    monkeypatch.chdir(tmp_path)  # no data here: the error names the command that makes the first prefix
    assert main(["config", "--config", str(REPO / "configs" / config)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(REPO / "configs" / config)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "transxssm demo" in line or "transxssm-preprocess run --input" in line, line


# ---------------------------------------------------------------------------------------------- 2/3. overrides
@pytest.mark.parametrize("argv", [
    ["--config", TINY, "--resume", "none", "train.steps=5", "logging.interval=1"],
    ["train.steps=5", "--config", TINY, "--resume", "none", "logging.interval=1"],
    ["--config", TINY, "train.steps=5", "--resume", "none", "logging.interval=1"],
])
@pytest.mark.parametrize("command", ["train", "config"])
def test_overrides_anywhere_among_the_options(command, argv):
    args = cli.parse_args([command, *argv])
    assert args.overrides == ["train.steps=5", "logging.interval=1"] and args.resume == "none"
    cfg = cli._load_config(args)
    assert (cfg.train.steps, cfg.logging.interval, cfg.checkpoint.resume) == (5, 1, "none")


def test_config_prints_overrides_given_after_the_options(capsys):
    assert main(["config", "--config", TINY, "train.steps=5", "--resume", "none", "logging.interval=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    got = (printed["train"]["steps"], printed["logging"]["interval"], printed["checkpoint"]["resume"])
    assert got == (5, 1, "none")


def test_unknown_options_are_still_rejected(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["train", "--config", TINY, "train.steps=5", "--restart", "auto"])
    assert exit_.value.code == 2 and "unrecognized arguments: --restart auto" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 4. help texts
def _subparser(*path: str):
    parser = cli.build_parser()
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def _help(*path: str) -> str:
    return " ".join(_subparser(*path).format_help().split())


def test_help_texts_match_the_code(tmp_path, monkeypatch, capsys):
    text = _help("demo")
    assert f"(default {demo.DEFAULT_STEPS})" in text and f"(default {demo.DEFAULT_OUT})" in text
    assert "(default: the built-in defaults)" in _help("config")
    assert "default: the config's checkpoint.resume (auto unless set)" in _help("train")
    assert RunConfig().checkpoint.resume == "auto"
    assert all(RunConfig.load(p).checkpoint.resume == "auto" for p in (REPO / "configs").glob("*.yaml"))
    assert "--quick" in _help("checkpoint", "list") and "--quick" not in _help("checkpoint", "verify")
    for path in [(), ("train",), ("config",), ("demo",), ("checkpoint",), ("checkpoint", "list"),
                 ("checkpoint", "verify")]:
        with pytest.raises(SystemExit) as exit_:
            cli.parse_args([*path, "--help"])
        assert exit_.value.code == 0

    # The demo's defaults as it runs them: `transxssm demo` trains DEFAULT_STEPS, half before the resume.
    runs = []

    def fake_train(cfg):
        runs.append(cfg)
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"step": cfg.train.exit_after_steps or cfg.train.steps, "run_dir": str(run_dir),
                "resumed_from": None, "skipped_total": 0, "checkpoint": None}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "find_assets", lambda: tmp_path)
    monkeypatch.setattr(demo, "preprocess_sample", lambda assets, data: (["d/a"], [1.0], 1000))
    monkeypatch.setattr("transxssm_megatron.training.loop.train", fake_train)
    assert main(["demo"]) == 0
    assert [(c.train.steps, c.train.exit_after_steps) for c in runs] == [(200, 100), (200, None)]
    assert runs[0].logging.run_dir == str(Path(demo.DEFAULT_OUT) / "run")
    assert "continue training: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 5. config defaults
def test_config_without_a_file_prints_the_defaults(capsys):
    assert main(["config"]) == 0
    captured = capsys.readouterr()
    printed = yaml.safe_load(captured.out)
    assert printed == RunConfig.load(None, need_data=False).to_dict()
    assert printed["train"] == dataclasses.asdict(TrainConfig()) and printed["data"]["prefixes"] == []
    assert captured.err.strip() == ("note: data.prefixes is empty; `transxssm train` needs preprocessed prefixes "
                                    "(data.prefixes=[...]) or data.mode=mock")
    assert main(["config", "train.steps=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 7
    with pytest.raises(ConfigError, match="data.prefixes: empty"):  # a run still needs data
        RunConfig.load(None)


# ---------------------------------------------------------------------------------------------- 6. keep_last=0
def test_keep_last_zero_keeps_every_checkpoint():
    from transxssm_megatron.training.checkpointing import CheckpointManager

    cfg = RunConfig.load(TINY, ["checkpoint.keep_last=0"])
    assert CheckpointManager(Path("unused"), keep_last=cfg.checkpoint.keep_last).keep_last is None  # None: all
    with pytest.raises(ConfigError) as err:
        RunConfig.load(TINY, ["checkpoint.keep_last=-1"])
    assert str(err.value) == "checkpoint.keep_last: -1; give the number of checkpoints to keep, or 0 to keep all"


# ---------------------------------------------------------------------------------------------- 7. summaries
def test_preprocess_summary_prints_without_the_progress_bar(small_assets, tmp_path, capsys):
    from transxssm_preprocess.cli import main as preprocess_main

    source = small_assets / "sample" / "python-edu"
    assert preprocess_main(["run", "--input", str(source), "--output-prefix", str(tmp_path / "x"),
                            "--tokenizer", str(TOKENIZER), "--workers", "1", "--no-progress"]) == 0
    assert f"[preprocess] {tmp_path / 'x'}.bin/.idx: 40 documents written" in capsys.readouterr().err


def test_demo_prints_each_tokenizing_summary(small_assets, tmp_path, capsys):
    demo.preprocess_sample(small_assets, tmp_path / "data")
    first = [line for line in capsys.readouterr().out.splitlines() if "[preprocess]" in line]
    demo.preprocess_sample(small_assets, tmp_path / "data")  # a second demo reuses the data and says so
    again = [line for line in capsys.readouterr().out.splitlines() if "[preprocess]" in line]
    assert len(first) == len(again) == 3
    assert all("40 documents written" in line and "0 empty skipped, 0 bad skipped" in line for line in first)
    assert all(line.startswith("[demo]     reused [preprocess]") for line in again)


# ---------------------------------------------------------------------------------------------- 8. run dir
def test_failed_start_removes_the_run_dir_it_created(tmp_path, capsys):
    run_dir = tmp_path / "new" / "deeper" / "run"
    assert main(["train", "--config", TINY, *MOCK, "train.global_batch_size=3", f"logging.run_dir={run_dir}",
                 "--resume", "none"]) == 2
    assert "train.global_batch_size: 3 is not a multiple" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()

    # A failure after config.yaml was written: a resume PATH that is no checkpoint (found once the model exists).
    not_a_checkpoint = tmp_path / "elsewhere"
    not_a_checkpoint.mkdir()
    assert main(["train", "--config", TINY, *MOCK, f"logging.run_dir={run_dir}",
                 "--resume", str(not_a_checkpoint)]) == 2
    _error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists() and not_a_checkpoint.is_dir()


def test_failed_start_leaves_an_existing_run_dir_as_it_was(tmp_path, capsys):
    kept, empty = tmp_path / "kept", tmp_path / "empty"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    empty.mkdir()
    before = _tree(kept)
    for run_dir in (kept, empty):
        assert main(["train", "--config", TINY, *MOCK, "train.global_batch_size=3", f"logging.run_dir={run_dir}",
                     "--resume", "none"]) == 2
        _error_line(capsys.readouterr().err)
    assert _tree(kept) == before
    assert empty.is_dir() and not any(empty.iterdir())


# ---------------------------------------------------------------------------------------------- 9. warnings
KNOWN_WARNINGS = [  # as megatron-core and torch emit them: (message, category, module)
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.", UserWarning,
     "megatron.core.transformer.transformer_config"),
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
     "process.", UserWarning, "torch.distributed.checkpoint.utils"),
    ("The argument order of load has been changed. Please check the document to avoid future breakages.",
     UserWarning, "torch.distributed.checkpoint.logger"),
]
KNOWN_LOGS = [("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local"),
              ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated and will be "
               "removed in the future releases.", None)]


def _emitted(monkeypatch, show: str) -> tuple[list[str], list[str]]:
    """Warnings and log records that get through, after the CLI's start, of the known ones and of ours."""
    monkeypatch.setenv("TRANSXSSM_SHOW_WARNINGS", show)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger(name) for name, _, _ in KNOWN_LOGS] + [logging.getLogger("transxssm_megatron.x")]
    saved = [list(lg.filters) for lg in loggers]
    for lg in loggers:
        lg.filters[:] = []  # as in a fresh process (earlier tests ran the CLI in this one)
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.quiet_third_party_warnings()
            for message, category, module in KNOWN_WARNINGS + [("our own note", UserWarning, "transxssm_megatron.x")]:
                warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)
            for name, message, arg in KNOWN_LOGS:
                logging.getLogger(name).warning(message, *([arg] if arg else []))
            logging.getLogger("transxssm_megatron.x").warning("our own log line")
    finally:
        for lg, filters in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.filters[:] = filters
    return [str(w.message) for w in caught], records


def test_known_third_party_warnings_are_hidden_unless_asked(monkeypatch):
    shown, logged = _emitted(monkeypatch, "")
    assert shown == ["our own note"] and logged == ["our own log line"]
    shown, logged = _emitted(monkeypatch, "1")
    assert len(shown) == len(KNOWN_WARNINGS) + 1 and len(logged) == len(KNOWN_LOGS) + 1


def test_cli_start_is_quiet():
    """The imports of a `transxssm train` (megatron-core, torch) print nothing, in a fresh interpreter."""
    code = ("import sys; from transxssm_megatron import cli; cli.quiet_third_party_warnings(); "
            "import transxssm_megatron.training.loop, transxssm_megatron.training.checkpointing, "
            "torch.utils.cpp_extension; import transxssm_preprocess.cli")
    env = {k: v for k, v in os.environ.items() if k != "TRANSXSSM_SHOW_WARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- 10. metrics
def test_resume_marks_metrics_and_readers_keep_the_last_record(tmp_path):
    cfg = RunConfig.load(TINY, [f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false"])
    quiet = dict(print_fn=lambda *a: None)
    first = MetricsWriter(cfg.run_dir, cfg, **quiet)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": 10.0 - step}, console=False)
    first.write({"step": 2, "val_loss": 9.5}, console=False)
    first.jsonl.write('{"step": 4, "lo')  # killed in the middle of a line
    first.close()

    resumed = MetricsWriter(cfg.run_dir, cfg, resume_step=2, **quiet)  # the checkpoint of step 2: 3 is redone
    resumed.write({"step": 3, "loss": 1.5}, console=False)
    resumed.write({"step": 4, "loss": 1.25}, console=False)
    resumed.close()

    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[4] == '{"step": 4, "lo'
    assert json.loads(lines[5]) == {"step": 2, "resumed_at_step": 2,
                                    "checkpoint": str(cfg.checkpoint_dir / "iter_0000002")}
    train, val = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in train] == [(1, 9.0), (2, 8.0), (3, 1.5), (4, 1.25)]
    assert val == [{"step": 2, "val_loss": 9.5}]
    assert read_metrics(tmp_path / "missing.jsonl") == ([], [])

    other = tmp_path / "elsewhere" / "iter_0000007"
    MetricsWriter(cfg.run_dir, cfg, resume_step=7, resumed_from=other, **quiet).close()
    assert json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["checkpoint"] == str(other)
