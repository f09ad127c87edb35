"""Context parallelism in the training loop and the CLI (CPU, gloo): a step at cp=2, alone and with recompute,
the reference path, DP, PP, VPP and TP + SP, equals one process's; config errors; and `transxssm train
parallel.cp=2` under torchrun trains, checkpoints and resumes at cp=1.

The model-level equivalence (every architecture, tp x cp, sequence parallelism) is tests/model/test_context_parallel.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from transxssm_megatron.config import ConfigError, ModelConfig
from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training.loop import Trainer
from transxssm_megatron.training.run_config import RunConfig

from test_loop import _flat_grads, _mock_config
from test_resume import _complete_checkpoints, _losses, _run, _train_args


def _config(run_dir: Path, parallel_options: dict, train_options: dict) -> RunConfig:
    """test_loop's mock run with 4 heads and 4 B/C groups (tp * cp up to 4 splits them), a layout on top."""
    cfg = _mock_config(run_dir, **train_options)
    cfg.model = ModelConfig.from_preset("tiny", num_layers=8, num_attention_heads=4, ss_groups=4)
    for key, value in parallel_options.items():
        setattr(cfg.parallel, key, value)
    cfg.validate()
    return cfg


def _masked_batches(trainer: Trainer, cfg: RunConfig):
    """The loop's micro-batches with the loss masked on the first 5 positions of every sample, so that the CP
    blocks carry different numbers of loss tokens; then each rank's block, as train_batches would cut it."""
    from megatron.core import parallel_state

    whole = data_lib.train_batches(trainer.datasets.train, trainer.consumed_samples, cfg,
                                   dataclasses.replace(trainer.world, cp=1))
    cp_rank = parallel_state.get_context_parallel_rank()
    for batch in whole:
        batch["loss_mask"][:, :5] = 0
        yield data_lib.context_parallel_block(batch, cp_rank, trainer.world.cp)


def _step(run_dir: str, parallel_options: dict, train_options: dict, resume: str = "none"):
    """One training step (resumed from `resume`); with no layout options, one step, a checkpoint, a second step
    (the checkpoint gives the other layouts the same weights: initialisation depends on the pipeline layout)."""
    cfg = _config(Path(run_dir), parallel_options, train_options)
    cfg.checkpoint.resume = resume
    trainer = Trainer(cfg)
    try:
        w = trainer.world
        plain = next(data_lib.train_batches(trainer.datasets.train, trainer.consumed_samples, cfg, w))
        first = next(_masked_batches(trainer, cfg))
        assert torch.equal(plain["tokens"], first["tokens"])      # train_batches cuts the same block
        batches = trainer._data_iterators(lambda: _masked_batches(trainer, cfg))
        checkpoint = None
        if not parallel_options:
            trainer.train_step(batches)
            checkpoint = str(trainer.save_checkpoint("after step 1"))
        result = trainer.train_step(batches)
        return dict(loss=result["loss"], grad_norm=result["grad_norm"], shape=first["tokens"].shape,
                    tokens=float(first["loss_mask"].sum()), grads=_flat_grads(trainer), checkpoint=checkpoint,
                    layout=(w.tp, w.pp, w.cp, w.dp))
    finally:
        trainer.close()   # run_distributed tears the process groups down


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: a step, a checkpoint, and the next step's loss, gradient norm and gradients."""
    from distributed import run_distributed

    return run_distributed(_step, 1, str(tmp_path_factory.mktemp("single")), {}, {})[0]


def test_context_parallel_step_equals_one_process(tmp_path, single):
    """cp=2 (each rank half of every sequence) == one process: same global-batch loss (the report summed over the
    CP ranks) and the same gradients after DDP's reduction over the data-parallel x context-parallel ranks,
    with loss masks that differ between the halves (fp32: relative 1e-5 on the loss, 1e-4 on gradients)."""
    from distributed import run_distributed

    results = run_distributed(_step, 2, str(tmp_path / "cp2"), {"cp": 2}, {}, single["checkpoint"])
    batch, seq = single["shape"]
    assert [r["shape"] for r in results] == [torch.Size([batch, seq // 2])] * 2
    halves = [r["tokens"] for r in results]
    assert sum(halves) == single["tokens"] and halves[0] < halves[1]    # the halves add up, unevenly masked
    for got in results:
        assert got["layout"] == (1, 1, 2, 1)
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        torch.testing.assert_close(got["grads"], single["grads"], rtol=1e-4, atol=1e-6)


# (parallel options, train options, world size, expected (tp, pp, cp, dp))
LAYOUTS = {
    "cp2-recompute": ({"cp": 2}, {"recompute": True}, 2, (1, 1, 2, 1)),
    "cp2-reference": ({"cp": 2}, {"fused": False}, 2, (1, 1, 2, 1)),
    "cp2-dp2": ({"cp": 2}, {"micro_batch_size": 2}, 4, (1, 1, 2, 2)),
    "pp2-cp2": ({"cp": 2, "pp": 2}, {"micro_batch_size": 2}, 4, (1, 2, 2, 1)),
    "pp2-vpp2-cp2": ({"cp": 2, "pp": 2, "vpp": 2}, {"micro_batch_size": 1}, 4, (1, 2, 2, 1)),
    "tp2-cp2-sequence-parallel": ({"cp": 2, "tp": 2, "sequence_parallel": True}, {}, 4, (2, 1, 2, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_composes_with_other_layouts(tmp_path, single, layout):
    """CP with activation recomputation, the unfused reference path, DP, PP (also interleaved) and TP + sequence
    parallelism, resumed from one process's checkpoint: that process's loss and global gradient norm on the next
    step (same global batch; fp32, relative 1e-5 and 1e-4)."""
    from distributed import run_distributed

    parallel_options, train_options, world, expected = LAYOUTS[layout]
    results = run_distributed(_step, world, str(tmp_path / layout), parallel_options, train_options,
                              single["checkpoint"])
    for got in results:
        assert got["layout"] == expected
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)


def _cfg(**parallel):
    return RunConfig.from_dict({"model": {"preset": "tiny"}, "parallel": parallel, "data": {"mode": "mock"},
                                "train": {"seq_length": 256}})


def test_context_parallel_config_errors():
    _cfg(cp=2)
    with pytest.raises(ConfigError, match=r"^parallel.cp: 0"):
        _cfg(cp=0)
    with pytest.raises(ConfigError, match=r"^num_attention_heads: 2 heads are not divisible by tp \* cp = 1 \* 4"):
        _cfg(cp=4)
    with pytest.raises(ConfigError, match=r"^ss_groups: G = 2 is not divisible by tp \* cp = 2 \* 2"):
        RunConfig.from_dict({"model": {"preset": "tiny", "num_attention_heads": 4}, "parallel": {"tp": 2, "cp": 2},
                             "data": {"mode": "mock"}, "train": {"seq_length": 256}})
    with pytest.raises(ConfigError, match=r"^train.seq_length: 255 is not divisible by parallel.cp = 2"):
        RunConfig.from_dict({"model": {"preset": "tiny"}, "parallel": {"cp": 2}, "data": {"mode": "mock"},
                             "train": {"seq_length": 255}})
    with pytest.raises(ConfigError, match=r"^parallel: tp\*pp\*cp = 2 does not divide the world size 3"):
        _cfg(cp=2).data_parallel_size(3)
    assert _cfg(cp=2).data_parallel_size(4) == 2


def test_cli_trains_at_context_parallel_2_and_resumes_at_1(tmp_path):
    """torchrun, 2 gloo ranks at cp=2: 3 steps, a checkpoint at step 2 and at the end; then the same run dir at
    cp=1 resumes to step 4 (the checkpoints of a CP run reshard like any other)."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "transxssm_megatron.cli"]
    _run(_train_args(run_dir, 4, 2, "parallel.cp=2", "train.exit_after_steps=3"), log, prefix=torchrun)
    assert "cp 2, dp 1" in log.read_text()
    assert _complete_checkpoints(run_dir) == ["iter_0000002", "iter_0000003"]
    before = _losses(run_dir)
    assert sorted(before) == [1, 2, 3]
    _run(_train_args(run_dir, 4, 2, "checkpoint.resume=auto"), log)
    after = _losses(run_dir)
    assert "resumed from" in log.read_text() and sorted(after) == [1, 2, 3, 4]
    assert all(after[s] == before[s] for s in (1, 2, 3)) and after[4] < before[1]
