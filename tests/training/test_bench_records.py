"""bench/run_record.py's GPU clock record: nvidia-smi's samples summarised over the busy ones (the run, not its
start-up), unreadable lines skipped, and nothing recorded where nvidia-smi is missing (this machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import run_record  # noqa: E402

SAMPLES = ["345, 78.6, 700.00, 0x0000000000000001",      # idle before the run: not counted
           "1980, 412.5, 700.00, 0x0000000000000000",
           "1710, 688.1, 700.00, 0x0000000000000004",     # held down by the software power cap
           "1650, 699.0, 700.00, 0x0000000000000004",
           "1755, 690.2, 700.00, 0x0000000000000084",     # power cap and hardware power brake
           "[N/A], [N/A], 700.00, [N/A]",
           "1710, 69"]                                    # cut off when the sampler stopped


def test_clock_summary_counts_only_busy_samples():
    summary = run_record.summarize_clocks(SAMPLES)
    assert summary.pop("power_w_median") == pytest.approx(689.15, abs=0.051)   # rounded to 0.1 W
    assert summary == {"samples": 4, "sm_clock_mhz_median": 1732.5, "sm_clock_mhz_min": 1650.0,
                       "sm_clock_mhz_max": 1980.0, "power_limit_w": 700.0, "power_capped_share": 0.75}


def test_idle_or_empty_samples_give_no_summary():
    assert run_record.summarize_clocks(SAMPLES[:1]) is None
    assert run_record.summarize_clocks([]) is None


def test_without_nvidia_smi_nothing_is_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(run_record.shutil, "which", lambda name: None)
    with run_record.GpuClocks(tmp_path / "clocks.csv") as clocks:
        pass
    assert clocks.summary() is None and not (tmp_path / "clocks.csv").exists()


@pytest.mark.skipif(run_record.shutil.which("nvidia-smi") is None, reason="needs nvidia-smi")
def test_sampler_writes_while_the_block_lasts(tmp_path):
    import time

    with run_record.GpuClocks(tmp_path / "clocks.csv"):
        time.sleep(1.2)
    assert (tmp_path / "clocks.csv").read_text().strip()
