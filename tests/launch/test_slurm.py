"""The SLURM launchers on a real one-node SLURM cluster (slurmctld + slurmd + munge, started by
scripts/slurm_local.sh and stopped afterwards): sbatch -> srun -> torchrun -> 2 gloo ranks of `transxssm train`.

- a tiny CPU job submitted with launch/slurm/train_320m.sbatch runs to the end and writes its checkpoint;
- (slow) SIGUSR1 to the batch shell, as SLURM sends before the time limit: the ranks save at the same step, the
  job requeues itself, and the second start resumes from that checkpoint and finishes.
If SLURM cannot be installed or started here, the SLURM tests skip and print why.
"""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start a private one-node cluster (own config dir and ports); yield the environment for sbatch & co."""
    state_dir = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_LOCAL_DIR=str(state_dir), SLURM_LOCAL_CTLD_PORT=str(_free_port()),
               SLURM_LOCAL_SLURMD_PORT=str(_free_port()))
    started = subprocess.run(["bash", str(SLURM_LOCAL), "start"], env=env, capture_output=True, text=True,
                             timeout=600)
    if started.returncode == 3:
        reason = started.stderr.strip().splitlines()[-1]
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert started.returncode == 0, f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}"
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, timeout=120)


def _sbatch(env, run_dir: Path, *overrides: str) -> tuple[str, Path]:
    out = run_dir.parent / f"{run_dir.name}.out"
    job_env = dict(env, CONFIG="configs/tiny.yaml", RUN_DIR=str(run_dir), GPUS_PER_NODE="2",
                   OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={out}", "launch/slurm/train_320m.sbatch",
         *TINY, *overrides], cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0], out


def _job_state(env, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    match = re.search(r"JobState=(\S+)", shown.stdout)
    return match.group(1) if match else "UNKNOWN"


def _wait(condition, what: str, out: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            log = out.read_text()[-4000:] if out.exists() else "(no job output yet)"
            raise AssertionError(f"timed out waiting for {what}; job output:\n{log}")
        time.sleep(1)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _complete(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*") if (p / "COMPLETE").is_file())


# ---------------------------------------------------------------------------------------------- tests
def test_launchers_are_valid_bash_with_preemption_directives():
    for name in ("train.sbatch", "train_320m.sbatch", "train_1.3b.sbatch"):
        script = REPO / "launch" / "slurm" / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, name
        text = script.read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text, name
    body = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    assert "scontrol show hostnames" in body and "--signals-to-handle" in body and "scontrol requeue" in body


def test_sbatch_tiny_job_runs_and_checkpoints(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, out = _sbatch(slurm, run_dir, "train.steps=4", "checkpoint.interval=0", "parallel.tp=2")
    _wait(lambda: _job_state(slurm, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
          "the job to end", out)
    text = out.read_text()
    assert _job_state(slurm, job) == "COMPLETED", text[-4000:]
    assert "world 2 (tp 2, pp 1, dp 1)" in text
    assert _logged_steps(run_dir) == [1, 2, 3, 4]
    assert _complete(run_dir) == ["iter_0000004"]


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, out = _sbatch(slurm, run_dir, "train.steps=40", "checkpoint.interval=0")
    _wait(lambda: len(_logged_steps(run_dir)) >= 2, "two training steps", out)
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    _wait(lambda: _job_state(slurm, job) == "PENDING", "the job to requeue itself", out)
    saved = _complete(run_dir)
    assert len(saved) == 1 and int(saved[0][5:]) < 40, saved
    # A requeued job waits for a begin time; release it now instead of minutes later.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    _wait(lambda: _job_state(slurm, job) in ("COMPLETED", "FAILED", "CANCELLED"), "the resumed job to end", out)
    text = out.read_text()
    assert _job_state(slurm, job) == "COMPLETED", text[-4000:]
    assert "forwarding to the training step" in text and "requeueing job" in text
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]}" in text
    assert sorted(set(_logged_steps(run_dir))) == list(range(1, 41))
    assert _complete(run_dir)[-1] == "iter_0000040"
