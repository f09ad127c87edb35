"""tokens/s windows (training/metrics.py Throughput): each holds exactly the steps finished in it, whatever the
host did between them (a training run's last window: tests/training/test_loop.py)."""

from __future__ import annotations

from transxssm_megatron.training.metrics import Throughput


def test_windows_count_the_steps_finished_between_their_marks():
    meter = Throughput(tokens_per_step=1000, flops_per_token=6.0, world_size=2, peak=1e4)
    meter.reset(10.0, step=4)                     # after step 4 (a validation before, say)
    first = meter.read(12.0, step=6)              # steps 5 and 6 in 2 s
    assert first["tokens_per_s"] == 1000.0 and first["step_time_s"] == 1.0
    assert first["tflops_per_device"] == 1000.0 * 6.0 / 2 / 1e12 and first["mfu"] == 3000.0 / 1e4
    second = meter.read(12.5, step=7)             # the next window starts where the last ended
    assert second["tokens_per_s"] == 2000.0 and second["step_time_s"] == 0.5
