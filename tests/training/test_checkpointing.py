"""CheckpointManager on a tiny TransXSSM model over gloo (CPU): exact round trip, resharding, atomicity, retention.

Each test trains a few real steps (megatron schedules, DDP, megatron's fp32 Adam, OptimizerParamScheduler),
saves with dist_checkpointing, loads into a freshly initialised model (another seed, possibly another TP/PP)
and checks the continuation: per-step losses after the load must equal those of the uninterrupted run
(bitwise at the same layout; to float tolerance after a change of layout, where reductions run in another
order). Losses depend on the weights *and* the Adam moments, so a wrong shard or lost optimizer state fails.
"""

import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from checkpoint_cases import MICRO_BATCH, SEQ, VOCAB, build_trainable as _build


# ---------------------------------------------------------------------------------------------- in-rank helpers
def _batch(step: int) -> torch.Tensor:
    """The global batch of `step` (same on every rank, every layout): (MICRO_BATCH, SEQ + 1) token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    loss = model(tokens[:, :-1], None, labels=tokens[:, 1:])

    def loss_func(per_token):
        mean = per_token.float().mean()
        return mean, {"loss": mean.detach()}

    return loss, loss_func


def _train(chunks, optimizer, scheduler, steps) -> list[float]:
    """Train on the batches of `steps`; returns each step's loss on every rank (broadcast from the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    losses = []
    for step in steps:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=_forward_step, data_iterator=iter([_batch(step)]),
                                   model=chunks, num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                                   forward_only=False)
        ok, _, _ = optimizer.step()
        assert ok
        scheduler.step(increment=1)
        loss = torch.tensor([reports[0]["loss"].item() if reports else 0.0], dtype=torch.float64)
        if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has it
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.MAX,
                                         group=ps.get_pipeline_model_parallel_group())
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- rank functions
def _round_trip(save_dir: str):
    """Train 3 steps, save, train 2 more (reference); fresh model (other seed), load, train the same 2 steps."""
    from transxssm_megatron.training.checkpointing import CheckpointManager

    chunks, opt, sched = _build(seed=1)
    first = _train(chunks, opt, sched, range(3))
    manager = CheckpointManager(save_dir, keep_last=2)
    path = manager.save(3, chunks, opt, sched, {"step": 3, "consumed_samples": 6})
    draw_after_save = torch.rand(4)
    reference = _train(chunks, opt, sched, range(3, 5))

    chunks, opt, sched = _build(seed=2)
    assert manager.latest() == path
    state = manager.load(manager.latest(), chunks, opt, sched)
    draw_after_load = torch.rand(4)  # the RNG continues exactly where the saving run was
    resumed = _train(chunks, opt, sched, range(3, 5))
    return first, reference, resumed, state, sched.num_steps, draw_after_save, draw_after_load


def _save_after_training(save_dir: str):
    """At the current layout: 3 steps, save, then the 2 reference steps."""
    from transxssm_megatron.training.checkpointing import CheckpointManager

    chunks, opt, sched = _build(seed=1)
    _train(chunks, opt, sched, range(3))
    CheckpointManager(save_dir).save(3, chunks, opt, sched, {"step": 3})
    return _train(chunks, opt, sched, range(3, 5))


def _load_and_continue(save_dir: str, load_optimizer: bool):
    from transxssm_megatron.training.checkpointing import CheckpointManager

    chunks, opt, sched = _build(seed=7)
    manager = CheckpointManager(save_dir)
    state = manager.load(manager.latest(), chunks, opt, sched, load_optimizer=load_optimizer)
    return state, _train(chunks, opt, sched, range(3, 5))


def _killed_save_then_retention(save_dir: str):
    """A save killed after writing its shards leaves no trace in latest(); keep_last prunes old checkpoints."""
    from megatron.core import dist_checkpointing

    from transxssm_megatron.training.checkpointing import CheckpointManager

    chunks, opt, sched = _build(seed=1)
    manager = CheckpointManager(save_dir, keep_last=2)
    _train(chunks, opt, sched, range(1))
    good = manager.save(1, chunks, opt, sched, {"step": 1})
    reference = [p.detach().clone() for p in chunks[0].parameters()]

    _train(chunks, opt, sched, range(1, 2))
    real_save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the shards were written, before the COMPLETE marker")

    dist_checkpointing.save = save_then_die
    try:
        manager.save(2, chunks, opt, sched, {"step": 2})
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    half_written = sorted(p.name for p in Path(save_dir).iterdir())
    latest_after_kill = manager.latest()

    fresh, fopt, fsched = _build(seed=5)
    state = manager.load_latest(fresh, fopt, fsched)
    restored = all(torch.equal(a, b) for a, b in zip(fresh[0].parameters(), reference))

    for step in (2, 3, 4):  # the next save cleans the .tmp folder; retention keeps the newest two
        manager.save(step, chunks, opt, sched, {"step": step})
    remaining = sorted(p.name for p in Path(save_dir).iterdir())
    return good, half_written, latest_after_kill, state, restored, remaining, manager.latest()


# ---------------------------------------------------------------------------------------------- tests
def test_round_trip_is_exact_at_the_same_layout(tmp_path):
    results = run_distributed(_round_trip, 2, str(tmp_path / "ckpt"), tp=2, timeout_s=240)
    first, reference, resumed, state, sched_steps, draw_saved, draw_loaded = results[0]
    assert first[0] > first[-1] - 1.0 and len(set(first)) == 3      # real, changing losses
    assert resumed == reference, "losses after load differ from the uninterrupted run"
    assert state == {"step": 3, "consumed_samples": 6}
    assert sched_steps == 5
    assert torch.equal(draw_saved, draw_loaded)
    assert results[1][2] == resumed                                   # both TP ranks agree


def test_tp2_pp2_checkpoint_continues_at_tp1_pp1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    reference = run_distributed(_save_after_training, 4, ckpt, tp=2, pp=2, timeout_s=240)[0]
    (state, resumed), = run_distributed(_load_and_continue, 1, ckpt, True, timeout_s=240)
    assert state == {"step": 3}
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=1e-5)

    # Loading the weights only gives a different continuation: the check above does see the optimizer state.
    (_, weights_only), = run_distributed(_load_and_continue, 1, ckpt, False, timeout_s=240)
    assert abs(weights_only[1] - reference[1]) > 1e-4


def test_tp1_checkpoint_loads_at_tp2_pp2(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    reference = run_distributed(_save_after_training, 1, ckpt, timeout_s=240)[0]
    results = run_distributed(_load_and_continue, 4, ckpt, True, tp=2, pp=2, timeout_s=240)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(reference), rtol=1e-5, atol=1e-5)


def test_killed_save_is_ignored_and_retention_keeps_last_k(tmp_path):
    save_dir = tmp_path / "ckpt"
    good, half_written, latest_after_kill, state, restored, remaining, latest = run_distributed(
        _killed_save_then_retention, 1, str(save_dir), timeout_s=240)[0]
    assert half_written == ["iter_0000001", "iter_0000002.tmp"]
    assert latest_after_kill == good
    assert state == {"step": 1} and restored
    assert remaining == ["iter_0000003", "iter_0000004"]
    assert latest == save_dir / "iter_0000004"


def test_latest_skips_unfinished_and_foreign_folders(tmp_path):
    from transxssm_megatron.training.checkpointing import COMPLETE_MARKER, CheckpointError, CheckpointManager

    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None
    for name in ("iter_0000010", "iter_0000030", "iter_0000040.tmp", "iter_0000050"):
        (tmp_path / name).mkdir()
    for name in ("iter_0000010", "iter_0000030", "iter_0000040.tmp"):
        (tmp_path / name / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "iter_0000060").write_text("a file, not a checkpoint")
    assert manager.latest() == tmp_path / "iter_0000030"  # 50 has no marker; 40 is still .tmp
    assert manager.step_of(manager.latest()) == 30
    # 40.tmp is newer than every checkpoint: it may be another job's save in progress, so cleaning keeps it.
    assert any("iter_0000040.tmp in place" in m for m in manager.clean_stale(intact=tmp_path / "iter_0000030"))
    assert (tmp_path / "iter_0000040.tmp").is_dir()
    with pytest.raises(CheckpointError, match="iter_0000050.*COMPLETE"):
        manager.read_metadata(tmp_path / "iter_0000050")
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)
    shutil.rmtree(tmp_path / "iter_0000030")
    assert manager.latest() == tmp_path / "iter_0000010"
