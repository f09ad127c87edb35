"""bench/train_speed.py's runs of ours: the global batch gives every data-parallel rank the micro-batches per step
one GPU would take, whatever layout the overrides set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import train_speed  # noqa: E402


@pytest.mark.parametrize("layout, processes, global_batch", [
    ((), 1, 16),                                   # 1.3b at 4K: micro-batch 2, 8 per step
    ((), 2, 32),                                   # DP = 2
    (("parallel.tp=2",), 2, 16),                   # TP = 2: one data-parallel rank
    (("parallel.tp=2",), 8, 64),                   # TP = 2 x DP = 4
])
def test_global_batch_follows_the_data_parallel_ranks(layout, processes, global_batch):
    config, overrides = train_speed.run_config_overrides("1.3b_4k", 7, 1, 8, Path("/tmp/run"), layout, processes)
    assert config == "configs/1.3b.yaml"
    assert f"train.global_batch_size={global_batch}" in overrides and "train.micro_batch_size=2" in overrides
