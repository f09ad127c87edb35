"""A failing rank of a multi-process `transxssm train` exits at once instead of hanging in interpreter teardown."""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import atexit, sys, time
    import transxssm_megatron.cli as cli
    import transxssm_megatron.training.loop as loop

    atexit.register(time.sleep, 600)   # stands in for teardown blocked on a collective the other ranks are in

    def failing_train(cfg):
        raise RuntimeError("dataset build failed on this rank")

    loop.train = failing_train         # `transxssm train` resolves it at call time
    sys.exit(cli.main(["train", "--config", "configs/tiny.yaml"]))
""")


def run_child(world_size: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WORLD_SIZE=world_size, RANK="1")
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)


def test_failing_rank_exits_without_teardown():
    proc = run_child("2")
    assert proc.returncode == 1
    assert "[rank 1] failed:" in proc.stderr
    assert "RuntimeError: dataset build failed on this rank" in proc.stderr


def test_single_process_raises_normally():
    """Without a process group to block on, the exception propagates as usual (and atexit handlers run)."""
    env = dict(os.environ, WORLD_SIZE="1")
    child = CHILD.replace("time.sleep, 600", "print, 'atexit ran'")
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "[rank" not in proc.stderr
    assert "atexit ran" in proc.stdout
