"""Exact resume and preemption, end to end through `transxssm train` (CPU, mock data), plus PreemptionHandler.

- kill -9 in the middle of a run, `--resume auto`: the per-step losses in metrics.jsonl equal those of an
  uninterrupted run bit for bit (deterministic mode, same layout);
- (slow) kill -9 at ten random moments, during steps and during checkpoint saves, resuming each time: losses, grad
  norms, learning rates and data position of every step equal an uninterrupted run's bit for bit;
- SIGTERM: the run saves a checkpoint at the step it reached and exits 0;
- (slow) a TP=2/PP=2 run under torchrun resumes at TP=1/PP=1 and keeps training.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from transxssm_megatron.cli import main

REPO = Path(__file__).resolve().parents[2]
TRANSXSSM = [sys.executable, "-c", "import sys; from transxssm_megatron.cli import main; sys.exit(main())"]

# A model small enough for seconds per step on one CPU core; mock data, fixed seed, deterministic kernels.
TINY = ["data.mode=mock", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.state_size=16",
        "model.vocab_size=256", "model.max_seq_length=32", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "train.device=cpu", "train.deterministic=true",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.keep_last=2"]


def _train_args(run_dir: Path, steps: int, interval: int, *extra: str) -> list[str]:
    return ["train", "--config", str(REPO / "configs" / "tiny.yaml"), *TINY, f"train.steps={steps}",
            f"checkpoint.interval={interval}", f"logging.run_dir={run_dir}", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(args: list[str], log: Path, prefix=TRANSXSSM, timeout=400) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        proc = subprocess.run(prefix + args, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}; log:\n{log.read_text()[-3000:]}"
    return proc


def _step_records(run_dir: Path) -> dict[int, dict]:
    """step -> training record from metrics.jsonl; a resumed run re-logs the steps after its checkpoint: the last
    wins. A line cut short by a kill is skipped (the step is logged again after the resume)."""
    records = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                records[record["step"]] = record
    return records


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in _step_records(run_dir).items()}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(TRANSXSSM + args, cwd=REPO, env=_env(), stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300, period: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before the condition; log:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out; log:\n{log.read_text()[-3000:]}")
        time.sleep(period)


def _complete_checkpoints(run_dir: Path) -> list[str]:
    ckpt = run_dir / "checkpoints"
    return sorted(p.name for p in ckpt.glob("iter_*") if (p / "COMPLETE").is_file()) if ckpt.is_dir() else []


# ---------------------------------------------------------------------------------------------- end to end
def test_kill_9_and_resume_gives_the_same_losses(tmp_path):
    steps, interval = 8, 3
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_log, log = tmp_path / "straight.log", tmp_path / "killed.log"
    # The uninterrupted reference and the run to be killed go side by side (one core each).
    reference_run = _start(_train_args(straight, steps, interval), straight_log)
    proc = _start(_train_args(killed, steps, interval), log)
    # Kill after the step-3 checkpoint and two more steps: steps 4-5 are lost and must be redone identically.
    _wait_for(lambda: "iter_0000003" in _complete_checkpoints(killed) and max(_losses(killed), default=0) >= 5,
              proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(killed)) < steps, "the run finished before it was killed; nothing was tested"

    # What a kill during a save leaves behind; --resume auto must skip both and take iter_0000003 (or 6).
    ckpt = killed / "checkpoints"
    (ckpt / "iter_0000007.tmp").mkdir()
    (ckpt / "iter_0000007.tmp" / "__0_0.distcp").write_bytes(b"half a shard")
    (ckpt / "iter_0000008").mkdir()
    _run(_train_args(killed, steps, interval, "checkpoint.resume=auto"), log)
    assert "resumed from" in log.read_text() and "iter_0000008" not in log.read_text().split("resumed from")[1][:80]
    assert not (ckpt / "iter_0000007.tmp").exists()  # cleaned by the next save
    assert reference_run.wait(timeout=300) == 0, straight_log.read_text()[-3000:]
    reference, resumed = _losses(straight), _losses(killed)
    assert sorted(reference) == list(range(1, steps + 1))
    assert resumed == reference, (f"per-step losses differ after kill + resume:\n"
                                  f"{ {s: (reference[s], resumed.get(s)) for s in reference} }")


# What must match bitwise after any number of kills: the trajectory, the schedule and the data position.
EXACT = ("loss", "grad_norm", "lr", "consumed_samples", "skipped_total")


def _metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _written_since(pattern: str, checkpoints: Path, since_ns: int) -> bool:
    """A path matching `pattern` in `checkpoints` changed after `since_ns` (a leftover of an earlier run is older)."""
    for path in checkpoints.glob(pattern):
        try:
            if path.stat().st_mtime_ns > since_ns:
                return True
        except FileNotFoundError:  # renamed or retired while looking
            pass
    return False


def _saves_begun(checkpoints: Path, since_ns: int, seen: set) -> set:
    """`seen` plus the `.tmp` folders (saves under way) written to since `since_ns`."""
    seen.update(p.name for p in checkpoints.glob("iter_*.tmp") if _written_since(p.name, checkpoints, since_ns))
    return seen


@pytest.mark.slow
def test_ten_random_kill_9s_during_steps_and_saves_then_exact_resume(tmp_path):
    steps, interval, kills = 100, 2, 10   # a save every other step: about half the training time is in saves
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_log, log = tmp_path / "straight.log", tmp_path / "killed.log"
    reference_run = _start(_train_args(straight, steps, interval), straight_log)
    args = _train_args(killed, steps, interval)
    args[1:1] = ["--resume", "auto"]
    rng = random.Random(20261207)
    # Each kill: after the k-th step logged (or the k-th save begun) since this launch's first checkpoint, plus up
    # to 0.1 s (a step takes ~0.1 s, a save ~0.2 s).
    moments = [(kind, rng.randint(1, 5) if kind == "step" else rng.randint(1, 2), rng.uniform(0, 0.1))
               for kind in rng.sample(["step", "save"] * (kills // 2), kills)]
    checkpoints, history = killed / "checkpoints", []
    for kind, k, delay in moments:
        launched = time.time_ns()
        proc = _start(args, log)
        # Progress first: a checkpoint of this launch (the first save of a process takes seconds, and a kill in
        # it every time would test the same moment ten times).
        _wait_for(lambda: _written_since("iter_*/COMPLETE", checkpoints, launched), proc, log, period=0.01)
        progressed, lines, saves = time.time_ns(), _metrics_lines(killed), set()
        if kind == "save":
            _wait_for(lambda: len(_saves_begun(checkpoints, progressed, saves)) >= k, proc, log, period=0.002)
        else:
            _wait_for(lambda: _metrics_lines(killed) >= lines + k, proc, log, period=0.002)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed; nothing was tested"
        in_save = _written_since("iter_*.tmp", checkpoints, progressed)
        history.append((kind, k, round(delay, 3), max(_losses(killed)), "in a save" if in_save else "in a step"))
    _run(args, log)
    assert reference_run.wait(timeout=300) == 0, straight_log.read_text()[-3000:]

    assert any(where == "in a save" for *_, where in history), f"no kill landed in a save: {history}"
    assert log.read_text().count("resumed from") == kills, history  # every launch after the first, and the last
    reference, resumed = _step_records(straight), _step_records(killed)
    assert sorted(reference) == sorted(resumed) == list(range(1, steps + 1))
    differing = {step: [(key, reference[step][key], resumed[step][key]) for key in EXACT
                        if reference[step][key] != resumed[step][key]] for step in reference}
    assert not any(differing.values()), (f"steps differ after kills {history}: "
                                         f"{ {s: d for s, d in differing.items() if d} }")
    assert main(["checkpoint", "verify", str(killed)]) == 0  # what the kills left behind was cleaned up
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"iter_{steps - interval:07d}", f"iter_{steps:07d}"]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = _start(_train_args(run_dir, 1000, 0), log)
    _wait_for(lambda: max(_losses(run_dir), default=0) >= 2, proc, log)
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 0, f"exit code {code}; log:\n{text[-3000:]}"
    saved = _complete_checkpoints(run_dir)
    assert len(saved) == 1 and "preempt" in text
    last_step = int(saved[0].split("_")[1])
    assert 2 <= last_step < 1000 and last_step >= max(_losses(run_dir))


@pytest.mark.slow
def test_tp2_pp2_run_resumes_at_tp1_pp1(tmp_path):
    """torchrun, 4 gloo ranks at TP=2/PP=2 for 4 steps; then the same run dir at TP=1/PP=1 to step 6."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                "transxssm_megatron.cli"]
    _run(_train_args(run_dir, 6, 4, "parallel.tp=2", "parallel.pp=2", "train.exit_after_steps=4"), log,
         prefix=torchrun, timeout=500)
    assert _complete_checkpoints(run_dir) == ["iter_0000004"]
    before = _losses(run_dir)
    _run(_train_args(run_dir, 6, 4, "checkpoint.resume=auto"), log)
    after = _losses(run_dir)
    assert "resumed from" in log.read_text() and sorted(after) == list(range(1, 7))
    assert all(after[s] == before[s] for s in range(1, 5))
    assert after[5] < before[1]  # still the trained model (a fresh init starts near ln(256) = 5.55)


# ---------------------------------------------------------------------------------------------- the handler
def test_handler_sets_flag_and_restores_previous_handlers():
    from transxssm_megatron.training.preemption import PreemptionHandler

    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested and not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread
        assert handler.requested and handler.should_stop() and handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _agree_on_stop(run_dir: str):
    from transxssm_megatron.training.preemption import PreemptionHandler

    handler = PreemptionHandler()
    before = handler.should_stop()
    clock = handler.poll(torch.distributed.get_rank() == 0)  # only rank 0's clock has passed the time limit
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 1:  # only one rank hears the signal
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    torch.distributed.barrier()
    after = handler.should_stop()
    marker = handler.mark_preempted(run_dir, step=7)
    handler.uninstall()
    return before, after, str(marker) if marker else None, clock


def test_all_ranks_agree_to_stop_when_one_is_signalled(tmp_path):
    results = run_distributed(_agree_on_stop, 2, str(tmp_path), timeout_s=120)
    assert [r[:2] for r in results] == [(False, True), (False, True)]
    assert [r[3] for r in results] == [(False, True), (False, True)]  # one rank out of time: all stop
    assert results[1][2] is None  # rank 0 writes the marker
    marker = json.loads((tmp_path / "PREEMPTED").read_text())
    assert marker["step"] == 7 and marker["signal"] == "peer rank"
