"""training/parallel.py: which cuBLAS workspace a run asks for, and that the environment's own choice wins."""

import os

import pytest

from transxssm_megatron.training.parallel import NO_WORKSPACE_FROM_HIDDEN, choose_cublas_workspace

VAR = "CUBLAS_WORKSPACE_CONFIG"
WIDE, NARROW = NO_WORKSPACE_FROM_HIDDEN, 768     # 1.3b's and 320m's hidden sizes


@pytest.mark.parametrize("cuda, deterministic, hidden, expected", [
    (True, False, WIDE, ":0:0"),         # wide models on CUDA: no workspace, so no memset before each matmul
    (True, False, NARROW, None),         # narrow ones keep PyTorch's default (320m trained 2.4% faster with it)
    (True, True, WIDE, ":4096:8"),       # repeatable GEMMs need cuBLAS's workspace
    (True, True, NARROW, ":4096:8"),
    (False, True, WIDE, ":4096:8"),
    (False, False, WIDE, None),          # CPU runs leave the environment alone
])
def test_workspace_by_run_kind(monkeypatch, cuda, deterministic, hidden, expected):
    monkeypatch.delenv(VAR, raising=False)
    choose_cublas_workspace(cuda=cuda, deterministic=deterministic, hidden_size=hidden)
    assert os.environ.get(VAR) == expected


@pytest.mark.parametrize("deterministic", [False, True])
def test_environment_wins(monkeypatch, deterministic):
    monkeypatch.setenv(VAR, ":16:8")
    choose_cublas_workspace(cuda=True, deterministic=deterministic, hidden_size=WIDE)
    assert os.environ[VAR] == ":16:8"
