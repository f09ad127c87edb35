"""The training loop on CPU (gloo): learning on the sample corpus, gradient accumulation, NaN/inf skipping.

Checkpoint / resume tests live with the checkpointing module (tests/training/test_checkpointing*.py).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from transxssm_megatron.cli import main
from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training import parallel
from transxssm_megatron.training.loop import Trainer, TrainingError
from transxssm_megatron.training.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / ".assets"


def _mock_config(run_dir: Path, **train) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"preset": "tiny", "num_layers": 8},
        "train": {"steps": 10, "seq_length": 32, "micro_batch_size": 4, "global_batch_size": 4,
                  "eval_interval": 0, "eval_iters": 0, **train},
        "optim": {"lr": 1e-3, "clip_grad": 0.0},  # no clipping: compare raw gradients
        "data": {"mode": "mock"},
        "checkpoint": {"resume": "none", "interval": 0, "save_at_end": False},
        "logging": {"run_dir": str(run_dir), "tensorboard": False},
    })


def _flat_grads(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().flatten().clone() for chunk in trainer.model for p in chunk.parameters()])


def _params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for chunk in trainer.model for p in chunk.parameters()])


def _one_step(run_dir: Path, micro_batch_size: int):
    cfg = _mock_config(run_dir, micro_batch_size=micro_batch_size)
    trainer = Trainer(cfg)
    try:
        assert trainer.num_microbatches == 4 // micro_batch_size
        batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
        result = trainer.train_step(batches)
        return result["loss"], _flat_grads(trainer)
    finally:
        trainer.close()
        parallel.teardown()


def test_grad_accumulation_equals_one_big_micro_batch(tmp_path):
    """Global batch 4 as 1 x 4, 2 x 2 and 4 x 1 micro-batches: same loss and same gradients."""
    loss4, grads4 = _one_step(tmp_path / "m4", 4)
    loss2, grads2 = _one_step(tmp_path / "m2", 2)
    loss1, grads1 = _one_step(tmp_path / "m1", 1)
    assert math.isfinite(loss4) and grads4.abs().sum() > 0
    assert loss2 == pytest.approx(loss4, rel=1e-5) and loss1 == pytest.approx(loss4, rel=1e-5)
    torch.testing.assert_close(grads2, grads4, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads1, grads4, rtol=1e-4, atol=1e-6)


def _poisonable(trainer: Trainer) -> dict:
    """Make the trainer's micro-batches give a NaN loss (poison["mode"] = "loss") or a finite loss with
    non-finite gradients ("grad") while poison["mode"] is set."""
    clean_step, poison = trainer.forward_step, {"mode": None}

    def forward_step(data_iterator, model):
        output, loss_fn = clean_step(data_iterator, model)
        if poison["mode"] == "loss":
            output = output * float("nan")
        elif poison["mode"] == "grad":
            output.register_hook(lambda g: g * float("inf"))
        return output, loss_fn

    trainer.forward_step = forward_step
    return poison


def test_nan_loss_or_grad_skips_the_step_and_stops_after_k_in_a_row(tmp_path):
    cfg = _mock_config(tmp_path / "nan", max_consecutive_skips=3)
    trainer = Trainer(cfg)
    try:
        batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
        poison = _poisonable(trainer)
        assert not trainer.train_step(batches)["skipped"]
        for mode in ("loss", "grad"):
            before, lr_steps = _params(trainer), trainer.scheduler.num_steps
            poison["mode"] = mode
            result = trainer.train_step(batches)
            assert result["skipped"], mode
            torch.testing.assert_close(_params(trainer), before, rtol=0, atol=0)  # no update
            assert trainer.scheduler.num_steps == lr_steps  # the schedule does not advance either
        assert (trainer.step, trainer.skipped_total, trainer.consecutive_skips) == (3, 2, 2)
        assert trainer.consumed_samples == 3 * cfg.train.global_batch_size  # the bad batch is not replayed

        poison["mode"] = None
        before = _params(trainer)
        assert not trainer.train_step(batches)["skipped"]
        assert not torch.equal(_params(trainer), before) and trainer.consecutive_skips == 0
        assert all(torch.isfinite(p).all() for chunk in trainer.model for p in chunk.parameters())

        poison["mode"] = "loss"
        trainer.train_step(batches)
        trainer.train_step(batches)
        with pytest.raises(TrainingError, match="3 consecutive steps had a NaN/inf loss.*Lower optim.lr"):
            trainer.train_step(batches)
    finally:
        trainer.close()
        parallel.teardown()


def _steps_with_a_skip(run_dir: Path, wait: bool, clip_grad: float = 0.0, steps: int = 5, skip_at: int = 2):
    """`steps` steps of the mock model, the one at index skip_at with a NaN loss, each settled at once (wait) or
    during the next one; the parameters, the steps' metrics, the schedule's step count, the skip count and the
    learning rate after them."""
    cfg = _mock_config(run_dir)
    cfg.optim.clip_grad = clip_grad
    trainer = Trainer(cfg)
    try:
        batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
        poison, results = _poisonable(trainer), []
        for step in range(steps):
            poison["mode"] = "loss" if step == skip_at else None
            results.append(trainer.train_step(batches, wait=wait))
        results.append(trainer.settle())
        return (_params(trainer), [r for r in results if r is not None], trainer.scheduler.num_steps,
                trainer.skipped_total, trainer.optimizer.param_groups[0]["lr"])
    finally:
        trainer.close()
        parallel.teardown()


def test_settling_a_step_during_the_next_changes_nothing(tmp_path):
    """The run loop settles each step (skip count, schedule) during the next one, after that one's
    forward/backward and before its update: the same parameters (bitwise), losses, learning rate and skips as
    settling every step at once, with a skipped step among them. The skip itself is decided on the device (the
    optimizer is torch's fused AdamW, given the flag)."""
    waited = _steps_with_a_skip(tmp_path / "wait", wait=True)
    deferred = _steps_with_a_skip(tmp_path / "deferred", wait=False)
    assert torch.equal(waited[0], deferred[0])
    losses = [torch.tensor([r["loss"] for r in run[1]]) for run in (waited, deferred)]
    torch.testing.assert_close(*losses, rtol=0, atol=0, equal_nan=True)
    assert [r["skipped"] for r in deferred[1]] == [False, False, True, False, False]
    assert [r["step"] for r in deferred[1]] == [1, 2, 3, 4, 5]
    assert waited[2:] == deferred[2:] and deferred[2] == 4 and deferred[3] == 1


def _megatron_step(optimizer, loss):
    """megatron's own update in place of update_unless_nonfinite: the skip and the norm read back on the host, the
    gradients clipped by a Python float inside optimizer.step() (which prepares them again, computes the norm again,
    clips and steps)."""
    if not torch.isfinite(loss):
        return torch.tensor(float("nan")), torch.tensor(1.0)
    optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    assert norm > 0.05 * 5            # the tests' clip_grad of 0.05 changes the update
    optimizer.step()
    return torch.tensor(norm), torch.tensor(0.0)


def test_update_equals_megatrons_own_step(tmp_path, monkeypatch):
    """With clipping active (clip_grad 0.05, well below the gradient norm): three steps, the second skipped, with
    the clip factor and the skip decided on the device give the parameters of megatron's optimizer.step() (the
    norm read back, the gradients clipped by a Python float, AdamW) up to rounding: fp32, relative 1e-6. (Over
    more updates rounding differences reach the loss and grow: Adam's near-sign update flips where a gradient is
    near zero.)"""
    from transxssm_megatron.training import fast_optimizer

    ours = _steps_with_a_skip(tmp_path / "ours", wait=False, clip_grad=0.05, steps=3, skip_at=1)
    monkeypatch.setattr(fast_optimizer, "update_unless_nonfinite", _megatron_step)
    reference = _steps_with_a_skip(tmp_path / "megatron", wait=True, clip_grad=0.05, steps=3, skip_at=1)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-8)
    assert [r["skipped"] for r in ours[1]] == [False, True, False] and ours[2:] == reference[2:]
    unclipped = _steps_with_a_skip(tmp_path / "unclipped", wait=True, steps=3, skip_at=1)
    assert (unclipped[0] - reference[0]).abs().max() > 1e-4


def test_update_without_the_fused_kernel_equals_megatrons_own_step(tmp_path, monkeypatch):
    """Where AdamW is not torch's fused kernel (no grad_scale, no found_inf), the clipping divides the gradients
    itself and the skip is decided on the host: the same parameters as megatron's optimizer.step() (fp32, relative
    1e-6), with clipping active and a skipped step among three."""
    from transxssm_megatron.training import fast_optimizer

    monkeypatch.setattr(fast_optimizer, "use_fused_adamw", lambda optimizer: False)
    ours = _steps_with_a_skip(tmp_path / "ours", wait=True, clip_grad=0.05, steps=3, skip_at=1)
    monkeypatch.setattr(fast_optimizer, "update_unless_nonfinite", _megatron_step)
    reference = _steps_with_a_skip(tmp_path / "megatron", wait=True, clip_grad=0.05, steps=3, skip_at=1)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-8)
    assert [r["skipped"] for r in ours[1]] == [False, True, False] and ours[2:] == reference[2:]


@pytest.fixture(scope="module")
def sample_prefix(tmp_path_factory):
    """The embedded sample's cosmopedia-v2 subset, tokenized with the GPT-NeoX tokenizer."""
    if not (ASSETS / "sample" / "cosmopedia-v2").is_dir():
        pytest.skip("offline assets missing: run `bash scripts/setup.sh`")
    from transxssm_preprocess import preprocess

    prefix = tmp_path_factory.mktemp("data") / "cosmopedia-v2"
    preprocess([str(ASSETS / "sample" / "cosmopedia-v2")], prefix, str(ASSETS / "tokenizer" / "gpt-neox-20b.json"),
               progress=False)
    return prefix


def test_tiny_model_validation_loss_falls_on_the_sample_corpus(sample_prefix, tmp_path):
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", str(REPO / "configs/tiny.yaml"), f"data.prefixes=[{sample_prefix}]",
               "train.steps=40", "train.seq_length=64", "train.micro_batch_size=8", "train.global_batch_size=8",
               "train.eval_interval=10", "train.eval_iters=2", "optim.lr=2e-3", "data.split=90,10,0",
               "logging.interval=5", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
               "checkpoint.interval=0", "checkpoint.save_at_end=false", "--resume", "none"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    assert len(val) == 4 and all(math.isfinite(v) for v in val)
    assert val[-1] < val[0] - 0.5, val            # learning on held-out documents
    assert val[0] < math.log(50304)                # already below the uniform-guess loss after 10 steps
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert {"lr", "grad_norm", "tokens_per_s", "tflops_per_device"} <= set(train[-1])
    saved = RunConfig.load(run_dir / "config.yaml")  # the resolved config is saved with the run
    assert saved.train.steps == 40 and saved.data.prefixes == [str(sample_prefix)]


def _dp_rank_grads(run_dir: str, overlap: bool = False):
    """Runs in each of 2 gloo ranks (tests/distributed.py): one step at DP=2, micro-batch 2, global batch 4."""
    cfg = _mock_config(Path(run_dir), micro_batch_size=2)
    cfg.parallel.overlap_grad_reduce = overlap
    trainer = Trainer(cfg)
    assert trainer.world.dp == 2 and trainer.num_microbatches == 1
    batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
    result = trainer.train_step(batches)
    trainer.close()
    return result["loss"], _flat_grads(trainer)


@pytest.mark.parametrize("overlap", [False, True], ids=["reduce-after-backward", "overlap-grad-reduce"])
def test_data_parallel_step_equals_one_process(tmp_path, overlap):
    """DP=2 x micro-batch 2 (DDP all-reduce, after the backward or overlapping it with parallel.overlap_grad_reduce)
    == 1 process x micro-batch 4: same global batch, loss and gradients."""
    from distributed import run_distributed

    loss1, grads1 = _one_step(tmp_path / "single", 4)
    results = run_distributed(_dp_rank_grads, 2, str(tmp_path / "dp"), overlap)
    for loss, grads in results:
        assert loss == pytest.approx(loss1, rel=1e-5)
        torch.testing.assert_close(grads, grads1, rtol=1e-4, atol=1e-6)


def _interleaved_pipeline_step(run_dir: str, checkpoint: str):
    """Each of 2 gloo ranks: PP=2 x 2 virtual stages (interleaved 1F1B), resumed from a PP=1 checkpoint."""
    cfg = _mock_config(Path(run_dir), micro_batch_size=1)
    cfg.parallel.pp, cfg.parallel.vpp = 2, 2
    cfg.checkpoint.resume = checkpoint
    trainer = Trainer(cfg)
    assert len(trainer.model) == 2 and trainer.num_microbatches == 4 and trainer.step == 1
    batches = trainer._data_iterators(
        lambda: data_lib.train_batches(trainer.datasets.train, trainer.consumed_samples, cfg, trainer.world))
    result = trainer.train_step(batches)
    trainer.close()
    return result["loss"], result["grad_norm"]


def test_interleaved_pipeline_step_equals_one_process(tmp_path):
    """Same weights, same global batch: PP=2 with virtual stages gives the loss and gradient norm of PP=1.

    The weights (and Adam state) come from a checkpoint of the single process after one step, so the check
    also covers the loop's resume into a different pipeline layout."""
    from distributed import run_distributed

    cfg = _mock_config(tmp_path / "single", micro_batch_size=1)
    trainer = Trainer(cfg)
    try:
        batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
        trainer.train_step(batches)
        checkpoint = trainer.save_checkpoint("after step 1")
        expected = trainer.train_step(batches)
        trainer.close()
    finally:
        parallel.teardown()
    results = run_distributed(_interleaved_pipeline_step, 2, str(tmp_path / "pp2vpp2"), str(checkpoint))
    for loss, grad_norm in results:
        assert loss == pytest.approx(expected["loss"], rel=1e-5)
        assert grad_norm == pytest.approx(expected["grad_norm"], rel=1e-4)


def _step_with(run_dir: Path, **train):
    cfg = _mock_config(run_dir, **train)
    trainer = Trainer(cfg)
    try:
        batches = data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world)
        return trainer.train_step(batches)["loss"], _flat_grads(trainer)
    finally:
        trainer.close()
        parallel.teardown()


@pytest.mark.parametrize("option", [{"recompute": True}, {"recompute": True, "recompute_layers": 3}, {"fused": False}],
                         ids=["recompute", "recompute-3-layers", "unfused"])
def test_speed_options_keep_loss_and_gradients(tmp_path, option):
    """train.recompute (activations recomputed in backward: all layers, or the first 3 of 8) and train.fused=false
    (megatron's LM head and cross-entropy instead of the chunked one) change no result: same loss and gradients as
    the default (fp32, relative 1e-6 and 1e-5)."""
    loss, grads = _step_with(tmp_path / "default")
    other_loss, other_grads = _step_with(tmp_path / "other", **option)
    assert grads.abs().sum() > 0
    assert abs(other_loss - loss) < 1e-6 * abs(loss)
    assert ((other_grads - grads).norm() / grads.norm()).item() < 1e-5   # fp32 sums in another order


def test_the_last_steps_speed_is_that_of_the_others(tmp_path):
    """tokens/s of the run's last step, logged after the loop with no next forward to launch, is like the others'
    (timed from the end of one update to the end of the next, it used to be several times too high)."""
    cfg = _mock_config(tmp_path, steps=6, seq_length=64, global_batch_size=16)
    cfg.logging.interval = 1
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
        parallel.teardown()
    speeds = [r["tokens_per_s"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "tokens_per_s" in r]
    assert len(speeds) == 6
    typical = statistics.median(speeds[1:-1])
    assert 0.5 * typical < speeds[-1] < 2 * typical, speeds
