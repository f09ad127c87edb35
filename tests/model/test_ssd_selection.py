"""Which SSD the SS mixer runs, and that a slow path is never silent: the fused kernels on CUDA, the reference on CPU,
for shapes the kernels do not take, or on request; an error on CUDA when the kernels cannot be imported."""

import logging
import types

import pytest

from transxssm_kernels.rope_ssd import ssd_chunked_reference
from transxssm_megatron.model import ss_mixer

CUDA_X = types.SimpleNamespace(is_cuda=True, shape=(2, 64, 4, 64))   # select_ssd reads only these
CPU_X = types.SimpleNamespace(is_cuda=False, shape=(2, 64, 4, 64))


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(ss_mixer, "_announced", set())
    monkeypatch.delenv("TRANSXSSM_SSD", raising=False)


def test_cuda_runs_the_fused_kernels(monkeypatch):
    fused = object()
    monkeypatch.setattr(ss_mixer, "rope_ssd", fused)
    assert ss_mixer.select_ssd(CUDA_X, 128, 256) is fused
    assert ss_mixer.select_ssd(CPU_X, 128, 256) is ssd_chunked_reference


def test_missing_kernels_on_cuda_are_an_error(monkeypatch):
    monkeypatch.setattr(ss_mixer, "rope_ssd", None)
    monkeypatch.setattr(ss_mixer, "ROPE_SSD_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match="triton.*TRANSXSSM_SSD=reference"):
        ss_mixer.select_ssd(CUDA_X, 128, 256)
    monkeypatch.setenv("TRANSXSSM_SSD", "reference")
    assert ss_mixer.select_ssd(CUDA_X, 128, 256) is ssd_chunked_reference


def test_slow_paths_are_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(ss_mixer, "rope_ssd", object())
    with caplog.at_level(logging.INFO, logger=ss_mixer.__name__):
        for _ in range(3):
            assert ss_mixer.select_ssd(CUDA_X, 96 + 8, 256) is ssd_chunked_reference   # N % 32 != 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "N=104" in warnings[0].getMessage()
