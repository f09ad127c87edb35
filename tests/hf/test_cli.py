"""The four subcommands through argparse, registered as the lead's one line in transxssm_megatron/cli.py will."""

import argparse
from pathlib import Path

import pytest
from hf_cases import TOKENIZER
from distributed import run_distributed


def _parser() -> argparse.ArgumentParser:
    from transxssm_megatron.hf.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="transxssm")
    parser.add_argument("--debug", action="store_true")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv) -> int:
    args = _parser().parse_args([str(a) for a in argv])
    return args.fn(args)


def test_registers_the_four_commands():
    parser = _parser()
    for argv in (["convert", "--to", "hf", "a", "b"], ["generate", "--checkpoint", "x", "--prompt", "hi"],
                 ["eval", "--model", "x", "--tasks", "piqa", "mmlu"], ["niah", "--model", "x"]):
        assert callable(parser.parse_args(argv).fn)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "x", "--tasks", "boolq"])


def test_generate_streams_text_from_an_export(tiny_export, capsys):
    assert _run("generate", "--checkpoint", tiny_export, "--prompt", "Once upon a time", "--max-new-tokens", 6,
                "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")


def _save_full_vocab(run_dir: str) -> None:
    """A SMALL transxssm with the real vocabulary, saved by the trainer's CheckpointManager with its config.yaml."""
    import yaml
    from hf_cases import small_model_config

    from transxssm_megatron.model.builder import build_model, build_transformer_config
    from transxssm_megatron.training.checkpointing import CheckpointManager

    cfg = small_model_config()
    model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))
    CheckpointManager(f"{run_dir}/checkpoints").save(5, [model], None, None, {"step": 5})
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))


@pytest.mark.slow  # ~13 s: a megatron save; convert and generate are covered separately by the fast tests
def test_generate_converts_a_megatron_checkpoint_on_the_fly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRANSXSSM_ASSETS", str(TOKENIZER.parents[1]))
    run_distributed(_save_full_vocab, 1, str(tmp_path / "run"), timeout_s=240)
    assert _run("generate", "--checkpoint", tmp_path / "run", "--prompt", "Hi", "--max-new-tokens", 4,
                "--temperature", 0.7, "--seed", 1) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert _run("convert", "--to", "hf", tmp_path / "missing", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing: no such checkpoint folder" in err and err.count("\n") == 1
    assert _run("eval", "--model", tmp_path, "--tasks", "piqa") == 2
    assert "not an export folder" in capsys.readouterr().err
