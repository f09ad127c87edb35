"""The SLURM launchers on a real one-node SLURM cluster (slurmctld + slurmd + munge, started by
scripts/slurm_local.sh and stopped afterwards): sbatch -> srun -> torchrun -> 2 gloo ranks of `transxssm train`.

- a tiny CPU job submitted with launch/slurm/train_320m.sbatch runs to the end and writes its checkpoint;
- (slow) SIGUSR1 to the batch shell, as SLURM sends before the time limit: the ranks save at the same step, the
  job requeues itself, and the second start resumes from that checkpoint and finishes.
If SLURM cannot be installed or started here, the SLURM tests skip and print why.
The multi-node path (two slurmd on this host) is in test_slurm_two_nodes.py; shared helpers in slurm_cases.py.
"""

import subprocess

import pytest
from slurm_cases import REPO, SLURM_LOCAL, complete, job_state, local_cluster, logged_steps, sbatch, wait


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private one-node cluster for this module."""
    with local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


# ---------------------------------------------------------------------------------------------- tests
def test_launchers_are_valid_bash_with_preemption_directives():
    for name in ("train.sbatch", "train_320m.sbatch", "train_1.3b.sbatch"):
        script = REPO / "launch" / "slurm" / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, name
        text = script.read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text, name
    body = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    assert "scontrol show hostnames" in body and "--signals-to-handle" in body and "scontrol requeue" in body
    # The first node hosts the rendezvous by rule, not by torchrun's guess from host names.
    assert "host=$((SLURM_NODEID == 0))" in body and 'is_host=$host' in body
    assert subprocess.run(["bash", "-n", str(SLURM_LOCAL)]).returncode == 0


def test_sbatch_tiny_job_runs_and_checkpoints(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, out = sbatch(slurm, run_dir, "train.steps=4", "checkpoint.interval=0", "parallel.tp=2")
    wait(lambda: job_state(slurm, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
          "the job to end", out)
    text = out.read_text()
    assert job_state(slurm, job) == "COMPLETED", text[-4000:]
    assert "world 2 (tp 2, pp 1, dp 1)" in text
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert complete(run_dir) == ["iter_0000004"]


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, out = sbatch(slurm, run_dir, "train.steps=40", "checkpoint.interval=0")
    wait(lambda: len(logged_steps(run_dir)) >= 2, "two training steps", out)
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait(lambda: job_state(slurm, job) == "PENDING", "the job to requeue itself", out)
    saved = complete(run_dir)
    assert len(saved) == 1 and int(saved[0][5:]) < 40, saved
    # A requeued job waits for a begin time; release it now instead of minutes later.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait(lambda: job_state(slurm, job) in ("COMPLETED", "FAILED", "CANCELLED"), "the resumed job to end", out)
    text = out.read_text()
    assert job_state(slurm, job) == "COMPLETED", text[-4000:]
    assert "forwarding to the training step" in text and "requeueing job" in text
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]}" in text
    assert sorted(set(logged_steps(run_dir))) == list(range(1, 41))
    assert complete(run_dir)[-1] == "iter_0000040"
