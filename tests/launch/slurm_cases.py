"""Shared by the SLURM launcher tests: a private local cluster of N slurmd on this host (scripts/slurm_local.sh),
job submission of the real launcher with a tiny CPU config, and waiting on job state, logged steps and
checkpoints."""

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
TINY = ["data.mode=mock", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.state_size=16",
        "model.vocab_size=256", "model.max_seq_length=32", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "train.device=cpu", "logging.interval=1",
        "logging.tensorboard=false"]


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 all free on 127.0.0.1 (now; nothing holds them afterwards)."""
    for _ in range(100):
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                for port in range(base + 1, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {count} consecutive free ports on 127.0.0.1")


@contextlib.contextmanager
def local_cluster(state_dir: Path, nodes: int = 1):
    """Start a private cluster of `nodes` slurmd on this host (own config dir and ports; skips the test when
    SLURM cannot run here); yield the environment for sbatch & co.; stop it afterwards."""
    env = dict(os.environ, SLURM_LOCAL_DIR=str(state_dir), SLURM_LOCAL_CTLD_PORT=str(free_port()),
               SLURM_LOCAL_SLURMD_PORT=str(free_port(nodes)))
    started = subprocess.run(["bash", str(SLURM_LOCAL), "start", "--nodes", str(nodes)], env=env,
                             capture_output=True, text=True, timeout=600)
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    try:  # stop whatever did start, also when a node did not come up
        if started.returncode == 3:
            reason = started.stderr.strip().splitlines()[-1]
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        assert started.returncode == 0, f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}"
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, timeout=120)


def sbatch(env, run_dir: Path, *overrides: str, nodes: int = 1,
            master_port: int | None = None) -> tuple[str, Path]:
    out = run_dir.parent / f"{run_dir.name}.out"
    job_env = dict(env, CONFIG="configs/tiny.yaml", RUN_DIR=str(run_dir), GPUS_PER_NODE="2",
                   OMP_NUM_THREADS="1", MASTER_PORT=str(master_port or free_port()))
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--output={out}",
         "launch/slurm/train_320m.sbatch", *TINY, *overrides], cwd=REPO, env=job_env, capture_output=True,
        text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0], out


def job_state(env, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    match = re.search(r"JobState=(\S+)", shown.stdout)
    return match.group(1) if match else "UNKNOWN"


def wait(condition, what: str, out: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            log = out.read_text()[-4000:] if out.exists() else "(no job output yet)"
            raise AssertionError(f"timed out waiting for {what}; job output:\n{log}")
        time.sleep(1)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def complete(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*") if (p / "COMPLETE").is_file())
