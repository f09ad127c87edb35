"""`transxssm train` on one CUDA GPU (mock data, a 4-layer 320m-shaped model, 2 micro-batches per step):
- a step replayed as a CUDA graph (the default on one GPU) gives the losses (relative 2e-3) and gradient norms
  (1e-2) of the eager step: the same kernels, except that the SSD backward sums a few values with atomics, in any
  order, and bf16 training at lr 1e-3 amplifies that over steps. Measured on an H200
  (bench/results/gpu-suite-2026-12-02.txt): losses within 1e-4, gradient norms within 3.2e-3 at step 6 of 8; a
  graph replaying stale buffers or skipping a micro-batch is off by far more;
- weight gradients added into the fp32 buffer by the matmuls (the default) give the losses and gradient norms of
  bf16 weight gradients added afterwards (`train.wgrad_fusion=false`; the same tolerances): a gradient counted
  twice or dropped moves the gradient norm by far more;
- a run resumed from its step-4 checkpoint (fused AdamW state, distributed optimizer) continues with the losses
  and gradient norms of the uninterrupted run (the same tolerances);
- the same with the CUDA graph, validating every 2 steps: the eager run's training and validation losses;
- two graphed trainers one after the other in one process (the demo's stop and resume): the eager run's losses;
- activations recomputed in 2 of the 4 layers and in all: the same losses and gradient norms, less peak memory;
- AdamW by transxssm_kernels.adamw, writing the bf16 parameters itself (the default), gives the losses and
  gradient norms of torch's fused AdamW followed by megatron's copy (TRANSXSSM_ADAMW=torch; the same
  tolerances): parameters left stale, or updated twice, would move them by far more.

    python -m pytest tests/gpu/test_train_gpu.py -q
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.mode=mock", "model.num_layers=4", "model.attention_period=2", "model.attention_offset=1",
         "train.seq_length=1024", "model.max_seq_length=1024", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.steps=8", "train.eval_interval=0", "train.eval_iters=0",
         "logging.interval=1", "logging.tensorboard=false", "optim.lr=1e-3", "checkpoint.save_at_end=false"]


def train(run_dir: Path, *overrides: str, env: dict | None = None, expect: str = "") -> list[dict]:
    cmd = [sys.executable, "-m", "transxssm_megatron.cli", "train", "--config", "configs/320m.yaml", *SMALL,
           f"logging.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout + proc.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


TOLERANCE = {"loss": 2e-3, "grad_norm": 1e-2}   # relative; see the module docstring


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        for key, tol in TOLERANCE.items():
            err = abs(ra[key] - rb[key]) / abs(rb[key])
            assert err < tol, f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"


EAGER = "train.cuda_graph=false"
GRAPHED = "forward+backward replayed as a CUDA graph"   # the log's speed line


def test_cuda_graph_matches_eager(tmp_path):
    eager = train(tmp_path / "eager", "checkpoint.interval=0", EAGER)
    graph = train(tmp_path / "graph", "checkpoint.interval=0", expect=GRAPHED)   # the default
    assert len({r["loss"] for r in eager}) > 1, "losses do not move: the comparison would prove nothing"
    assert_same_steps(graph, eager)
    for run in (eager, graph):   # tokens/s timed on the device: the last step like the steady ones before it
        speeds = [r["tokens_per_s"] for r in run]
        typical = statistics.median(speeds[2:-1])   # after compilation and the graph's capture
        assert 0.5 * typical < speeds[-1] < 2 * typical, speeds


def test_cuda_graph_with_validation_and_resume(tmp_path):
    """Validation every 2 steps between replayed ones, and a run resumed from a checkpoint into a new graph: the
    eager run's training and validation losses (the same tolerances)."""
    evals = ["train.eval_interval=2", "train.eval_iters=1"]
    eager = train(tmp_path / "eager", "checkpoint.interval=0", EAGER, *evals)
    graph = train(tmp_path / "graph", "checkpoint.interval=4", *evals, expect=GRAPHED)
    checkpoint = tmp_path / "graph" / "checkpoints" / "iter_0000004"
    resumed = train(tmp_path / "resumed", "checkpoint.interval=0", *evals, f"checkpoint.resume={checkpoint}",
                    expect=GRAPHED)
    assert_same_steps(graph, eager)
    assert_same_steps(resumed, eager[4:])

    def validation(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]

    want = validation("eager")
    assert len(want) >= 4
    for run, expected in (("graph", want), ("resumed", [v for v in want if v[0] > 4])):
        got = validation(run)
        assert [s for s, _ in got] == [s for s, _ in expected], run
        assert all(abs(a - b) / abs(b) < TOLERANCE["loss"] for (_, a), (_, b) in zip(got, expected)), (got, expected)


TWO_TRAINERS = """
import sys
from transxssm_megatron.training.loop import train
from transxssm_megatron.training.run_config import RunConfig
overrides = sys.argv[2:]
train(RunConfig.load("configs/320m.yaml", overrides + ["train.exit_after_steps=4", "checkpoint.interval=4"]))
train(RunConfig.load("configs/320m.yaml", overrides + ["checkpoint.resume=auto", "checkpoint.interval=0"]))
"""


def test_two_graphed_trainers_in_one_process(tmp_path):
    """The demo's pattern, under the one-GPU default: a trainer stops at step 4 with a checkpoint and a second one
    in the same process resumes it, capturing its own graph (the first's is released): the eager run's losses."""
    eager = train(tmp_path / "eager", "checkpoint.interval=0", EAGER)
    run_dir = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-c", TWO_TRAINERS, "-", *SMALL, f"logging.run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(GRAPHED) == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert_same_steps([r for r in map(json.loads, lines) if "loss" in r], eager)


def test_recompute_layers_trade_memory_for_the_same_losses(tmp_path):
    """train.recompute on 2 of the 4 layers, and on all: the losses of the run without, and a lower peak of
    allocated memory the more layers are recomputed (all three eager: recompute leaves the graph off)."""
    runs = {name: train(tmp_path / name, "checkpoint.interval=0", EAGER, *extra) for name, extra in
            (("none", []), ("two", ["train.recompute=true", "train.recompute_layers=2"]),
             ("all", ["train.recompute=true"]))}
    for name in ("two", "all"):
        assert_same_steps(runs[name], runs["none"])
    peak = {name: max(r.get("mem_peak_gib", 0) for r in records) for name, records in runs.items()}
    assert peak["none"] > peak["two"] > peak["all"] > 0, peak


def test_wgrad_fusion_matches_separate_add(tmp_path):
    separate = train(tmp_path / "separate", "checkpoint.interval=0", "train.wgrad_fusion=false")
    fused = train(tmp_path / "fused", "checkpoint.interval=0")
    assert len({r["loss"] for r in separate}) > 1, "losses do not move: the comparison would prove nothing"
    assert_same_steps(fused, separate)


def test_resume_continues_the_run(tmp_path):
    whole = train(tmp_path / "whole", "checkpoint.interval=4")
    checkpoint = tmp_path / "whole" / "checkpoints" / "iter_0000004"
    assert checkpoint.is_dir()
    resumed = train(tmp_path / "resumed", "checkpoint.interval=0", f"checkpoint.resume={checkpoint}")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert_same_steps(resumed, whole[4:])


def test_triton_adamw_matches_torch_adamw(tmp_path):
    torch_adamw = train(tmp_path / "torch", "checkpoint.interval=0", env={"TRANSXSSM_ADAMW": "torch"},
                        expect="AdamW: torch's fused kernel, then megatron's copy")
    triton_adamw = train(tmp_path / "triton", "checkpoint.interval=0", expect="AdamW: one Triton launch")
    assert len({r["loss"] for r in torch_adamw}) > 1, "losses do not move: the comparison would prove nothing"
    assert_same_steps(triton_adamw, torch_adamw)
