"""`transxssm train` on two CUDA GPUs under torchrun, with every fused path on (the default), against one GPU (mock
data, a 4-layer 320m-shaped model, 4 sequences of 1,024 tokens per step). The one-GPU run trains 8 steps and saves
at step 4; each two-GPU run resumes from that checkpoint (resharded on load: megatron initialises TP shards and
pipeline stages from other random streams, so only a loaded model is the same model) and trains steps 5-8:
- DP = 2 with the distributed optimizer: each rank's AdamW kernel updates its shard of the parameters and writes
  that shard's bf16 copy; megatron gathers the rest;
- TP = 2 with sequence parallelism: the vocab-parallel LM head (compiled cross-entropy pieces, one all-gather of
  per-rank statistics per chunk), the norms on sequence shards, the AdamW kernel on split tensors;
- PP = 2 with two virtual stages per rank (interleaved 1F1B): the LM head on the last stage, the tied embedding's
  gradient summed over the two stages;
- CP = 2: each rank half of every sequence, all-to-alls around the mixers;
- DP = 2 with the gradient reduce-scatter and the parameter all-gather overlapped with compute, and a resume from
  its checkpoint (which must hold the last update of every weight, not only of the rank's own shard);
- the Jamba baseline at TP = 2 with sequence parallelism: its conv1d and output-gate kernels on head shards.
Every step matches within relative 1e-3 in loss and 1e-2 in gradient norm: the layouts sum matmuls and
reductions in other orders in bf16 (TP=2 reduces the row-parallel layers' partial outputs in bf16), and the SSD's
backward adds a few values with atomics. Measured on two H200s (bench/results/gpu-tests-2gpu-2026-12-04.txt): at
most 6.4e-5 in loss and 1.8e-3 in gradient norm (PP=2). A shard left stale, a gradient counted twice or dropped, a
wrong vocabulary slice or optimizer state loaded into the wrong shard is off by far more. Each step's differences
are printed (run with -s).

    python -m pytest tests/gpu/test_multi_gpu_train.py -q -s      # needs 2 GPUs
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.mode=mock", "model.num_layers=4", "model.attention_period=2", "model.attention_offset=1",
         "train.seq_length=1024", "model.max_seq_length=1024", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.steps=8", "train.eval_interval=0", "train.eval_iters=0",
         "logging.interval=1", "logging.tensorboard=false", "optim.lr=1e-3", "checkpoint.save_at_end=false"]
TOLERANCE = {"loss": 1e-3, "grad_norm": 1e-2}   # relative; see the module docstring


def train(run_dir: Path, gpus: int, *overrides: str, expect: str = "AdamW: one Triton launch",
          config: str = "320m") -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    cmd = [*launcher, "-m", "transxssm_megatron.cli", "train", "--config", f"configs/{config}.yaml", *SMALL,
           f"logging.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "AdamW: one Triton launch" in log and expect in log, log[-2000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory) -> tuple[list[dict], Path]:
    run_dir = tmp_path_factory.mktemp("one_gpu")
    steps = train(run_dir, 1, "checkpoint.interval=4")
    assert len({r["loss"] for r in steps[4:]}) > 1, "losses do not move: the comparison would prove nothing"
    checkpoint = run_dir / "checkpoints" / "iter_0000004"
    assert checkpoint.is_dir()
    return steps[4:], checkpoint


@pytest.mark.parametrize("layout", [["parallel.tp=1"],
                                    ["parallel.tp=2", "parallel.sequence_parallel=true"],
                                    ["parallel.pp=2", "parallel.vpp=2"], ["parallel.cp=2"]],
                         ids=["dp2", "tp2-sp", "pp2-vpp2", "cp2"])
def test_two_gpus_match_one(one_gpu, layout, tmp_path):
    one_gpu, checkpoint = one_gpu
    two = train(tmp_path / "two", 2, "checkpoint.interval=0", f"checkpoint.resume={checkpoint}", *layout)
    assert_matches(two, one_gpu, " ".join(layout))


def test_overlapped_data_parallel_matches_one_and_saves_the_update(one_gpu, tmp_path):
    """DP = 2 with the gradient reduce-scatter and the parameter all-gather overlapped with compute; its
    checkpoint at step 6, taken before a next forward has gathered step 6's update, resumes (without overlap)
    into steps 7-8 that match too: a stale half of the weights in the checkpoint would not."""
    one_gpu, checkpoint = one_gpu
    overlap = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
    two = train(tmp_path / "two", 2, "checkpoint.interval=2", f"checkpoint.resume={checkpoint}", *overlap,
                expect="gradient reduce and parameter all-gather overlapped with compute")
    assert_matches(two, one_gpu, "overlapped")
    saved = tmp_path / "two" / "checkpoints" / "iter_0000006"
    resumed = train(tmp_path / "resumed", 2, "checkpoint.interval=0", f"checkpoint.resume={saved}")
    assert_matches(resumed, one_gpu[2:], "resumed from the overlapped run's step 6")


def test_jamba_tensor_parallel_matches_one(tmp_path):
    """The Jamba baseline's own kernels (split + causal conv1d, output gate norm) on TP shards: TP = 2 with
    sequence parallelism against one GPU, from the one-GPU run's checkpoint at step 4."""
    one = train(tmp_path / "one", 1, "checkpoint.interval=4", config="jamba_320m")
    assert len({r["loss"] for r in one[4:]}) > 1, "losses do not move: the comparison would prove nothing"
    two = train(tmp_path / "two", 2, "checkpoint.interval=0",
                f"checkpoint.resume={tmp_path / 'one' / 'checkpoints' / 'iter_0000004'}", "parallel.tp=2",
                "parallel.sequence_parallel=true", config="jamba_320m")
    assert_matches(two, one[4:], "jamba tp2-sp")


def assert_matches(two: list[dict], one: list[dict], label: str) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one] and two
    diffs = {key: [abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(two, one)] for key in TOLERANCE}
    print(f"\n{label}: relative difference to one GPU by step",
          {key: [f"{d:.1e}" for d in values] for key, values in diffs.items()})
    for key, values in diffs.items():
        assert max(values) < TOLERANCE[key], f"{key}: {[r[key] for r in two]} vs {[r[key] for r in one]}"
