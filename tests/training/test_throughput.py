"""tokens/s windows (training/metrics.py Throughput): each holds exactly the steps finished in it, whatever the
host did between them; and in a training run the last step's window is a step like the others (it used to end
before a next forward that never came, which made the last record's tokens/s several times too high)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from transxssm_megatron.training import parallel
from transxssm_megatron.training.loop import Trainer
from transxssm_megatron.training.metrics import Throughput
from transxssm_megatron.training.run_config import RunConfig


def test_windows_count_the_steps_finished_between_their_marks():
    meter = Throughput(tokens_per_step=1000, flops_per_token=6.0, world_size=2, peak=1e4)
    meter.reset(10.0, step=4)                     # after step 4 (a validation before, say)
    first = meter.read(12.0, step=6)              # steps 5 and 6 in 2 s
    assert first["tokens_per_s"] == 1000.0 and first["step_time_s"] == 1.0
    assert first["tflops_per_device"] == 1000.0 * 6.0 / 2 / 1e12 and first["mfu"] == 3000.0 / 1e4
    second = meter.read(12.5, step=7)             # the next window starts where the last ended
    assert second["tokens_per_s"] == 2000.0 and second["step_time_s"] == 0.5


def test_the_last_steps_speed_is_that_of_the_others(tmp_path):
    cfg = RunConfig.from_dict({
        "model": {"preset": "tiny", "num_layers": 8},
        "train": {"steps": 6, "seq_length": 64, "micro_batch_size": 4, "global_batch_size": 16,
                  "eval_interval": 0, "eval_iters": 0},
        "data": {"mode": "mock"}, "checkpoint": {"resume": "none", "interval": 0, "save_at_end": False},
        "logging": {"run_dir": str(tmp_path), "tensorboard": False, "interval": 1}})
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
        parallel.teardown()
    speeds = [json.loads(line).get("tokens_per_s") for line in (Path(tmp_path) / "metrics.jsonl").open()]
    speeds = [s for s in speeds if s]
    assert len(speeds) == 6
    typical = statistics.median(speeds[1:-1])
    assert 0.5 * typical < speeds[-1] < 2 * typical, speeds
