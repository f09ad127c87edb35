"""bench/run_record.py's GPU clock record: nvidia-smi's samples summarised over the busy ones (the run, not its
start-up), unreadable lines skipped, and nothing recorded where nvidia-smi is missing (this machine); the GPUs'
UUIDs; and on_gpus, which spreads a benchmark's rows over the GPUs of one machine."""

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


def test_gpu_uuids_name_each_visible_gpu_as_nvidia_smi_does(monkeypatch):
    import types
    import uuid

    import torch

    ids = [uuid.UUID(int=7), uuid.UUID(int=9)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=ids[i]))
    assert run_record.gpu_uuids() == [f"GPU-{ids[0]}", f"GPU-{ids[1]}"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_record.gpu_uuids() == []


def test_environment_records_the_kernel_choices_made_by_environment_variables(monkeypatch):
    for name in [k for k in run_record.os.environ if k.startswith("TRANSXSSM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRANSXSSM_CONV_KERNELS", "1")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert run_record.environment()["environment_variables"] == {"TRANSXSSM_CONV_KERNELS": "1"}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert run_record.environment()["environment_variables"] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                                                                 "TRANSXSSM_CONV_KERNELS": "1"}


def test_on_gpus_runs_every_item_once_on_gpus_at_once_in_order():
    import threading

    both_busy = threading.Barrier(2, timeout=10)   # broken unless two items run at the same time
    seen, snapshots = [], []

    def work(item, slot):
        if item < 2:
            both_busy.wait()
        seen.append((item, slot.index))
        return item * 10

    results = run_record.on_gpus(list(range(5)), 2, work, snapshots.append)
    assert results == [0, 10, 20, 30, 40]
    assert sorted(i for i, _ in seen) == list(range(5))
    assert {gpu for i, gpu in seen if i < 2} == {0, 1}
    assert len(snapshots) == 5 and snapshots[-1] == results
    assert all(len(s) == 5 and sum(x is not None for x in s) == n + 1 for n, s in enumerate(snapshots))


def test_on_gpus_stops_handing_out_items_after_an_error():
    started = []

    def work(item, slot):
        started.append(item)
        if item == 1:
            raise RuntimeError("row 1 failed")
        return item

    with pytest.raises(RuntimeError, match="row 1 failed"):
        run_record.on_gpus([0, 1, 2, 3], 1, work)
    assert started == [0, 1]


def test_gpu_slot_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slot = run_record.GpuSlot(1)
    assert (slot.index, slot.smi_index, slot.env["CUDA_VISIBLE_DEVICES"]) == (1, "3", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    slot = run_record.GpuSlot(1)
    assert (slot.smi_index, slot.env["CUDA_VISIBLE_DEVICES"]) == ("1", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    slot = run_record.GpuSlot(1, count=2)        # a row trained by two processes: the second pair of GPUs
    assert (slot.smi_index, slot.env["CUDA_VISIBLE_DEVICES"]) == ("6", "6,7")


def test_on_gpus_hands_each_item_a_group_of_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []
    run_record.on_gpus(list(range(4)), 5, lambda item, slot: seen.append(slot.env["CUDA_VISIBLE_DEVICES"]),
                       per_item=2)
    assert len(seen) == 4 and set(seen) <= {"0,1", "2,3"}   # two groups of two; the fifth GPU left idle
