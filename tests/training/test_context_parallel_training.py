"""Context parallelism in the training loop and the CLI (CPU, gloo): a cp=2 step equals one process's, config
errors, and `transxssm train parallel.cp=2` under torchrun trains, checkpoints and resumes at cp=1.

The model-level equivalence (every architecture, tp x cp, sequence parallelism) is tests/model/test_context_parallel.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from transxssm_megatron.config import ConfigError
from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training import parallel
from transxssm_megatron.training.loop import Trainer
from transxssm_megatron.training.run_config import RunConfig

from test_loop import _flat_grads, _mock_config
from test_resume import _complete_checkpoints, _losses, _run, _train_args


def _masked_batches(trainer: Trainer, cfg: RunConfig):
    """The loop's micro-batches with the loss masked on the first 5 positions of every sample, so that the CP
    blocks carry different numbers of loss tokens; then each rank's block, as train_batches would cut it."""
    from megatron.core import parallel_state

    whole = data_lib.train_batches(trainer.datasets.train, 0, cfg, dataclasses.replace(trainer.world, cp=1))
    cp_rank = parallel_state.get_context_parallel_rank()
    for batch in whole:
        batch["loss_mask"][:, :5] = 0
        yield data_lib.context_parallel_block(batch, cp_rank, trainer.world.cp)


def _step(run_dir: str, cp: int):
    cfg = _mock_config(Path(run_dir))
    cfg.parallel.cp = cp
    trainer = Trainer(cfg)
    try:
        assert trainer.world.cp == cp and trainer.world.dp == 1 and trainer.num_microbatches == 1
        plain = next(data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world))
        batches = _masked_batches(trainer, cfg)
        first = next(_masked_batches(trainer, cfg))
        assert torch.equal(plain["tokens"], first["tokens"])      # train_batches cuts the same block
        result = trainer.train_step(batches)
        return result["loss"], _flat_grads(trainer), first["tokens"].shape, float(first["loss_mask"].sum())
    finally:
        trainer.close()
        parallel.teardown()


def test_context_parallel_step_equals_one_process(tmp_path):
    """cp=2 (each rank half of every sequence) == one process: same global-batch loss (the report summed over the
    CP ranks) and the same gradients after DDP's reduction over the data-parallel x context-parallel ranks,
    with loss masks that differ between the halves (fp32: relative 1e-5 on the loss, 1e-4 on gradients)."""
    from distributed import run_distributed

    loss1, grads1, shape1, tokens1 = run_distributed(_step, 1, str(tmp_path / "single"), 1)[0]
    results = run_distributed(_step, 2, str(tmp_path / "cp2"), 2)
    assert [r[2] for r in results] == [torch.Size([shape1[0], shape1[1] // 2])] * 2
    halves = [r[3] for r in results]
    assert sum(halves) == tokens1 and halves[0] < halves[1]       # the halves add up, unevenly masked
    for loss, grads, _, _ in results:
        assert loss == pytest.approx(loss1, rel=1e-5)
        torch.testing.assert_close(grads, grads1, rtol=1e-4, atol=1e-6)


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
    """torchrun, 2 gloo ranks at cp=2 for 3 steps with a checkpoint; then the same run dir at cp=1 to step 4."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "transxssm_megatron.cli"]
    _run(_train_args(run_dir, 4, 3, "parallel.cp=2", "train.exit_after_steps=3"), log, prefix=torchrun)
    text = log.read_text()
    assert "cp 2, dp 1" in text and _complete_checkpoints(run_dir) == ["iter_0000003"]
    before = _losses(run_dir)
    assert sorted(before) == [1, 2, 3]
    _run(_train_args(run_dir, 4, 3, "checkpoint.resume=auto"), log)
    after = _losses(run_dir)
    assert "resumed from" in log.read_text() and sorted(after) == [1, 2, 3, 4]
    assert after[4] < before[1]
