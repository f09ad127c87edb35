"""training/parallel.py: which cuBLAS workspace a run asks for, and that the environment's own choice wins."""

import os

import pytest

from transxssm_megatron.training.parallel import choose_cublas_workspace

VAR = "CUBLAS_WORKSPACE_CONFIG"


@pytest.mark.parametrize("cuda, deterministic, expected", [
    (True, False, ":0:0"),        # CUDA training: no workspace, so no memset before each matmul
    (True, True, ":4096:8"),      # repeatable GEMMs need cuBLAS's workspace
    (False, True, ":4096:8"),
    (False, False, None),         # CPU runs leave the environment alone
])
def test_workspace_by_run_kind(monkeypatch, cuda, deterministic, expected):
    monkeypatch.delenv(VAR, raising=False)
    choose_cublas_workspace(cuda=cuda, deterministic=deterministic)
    assert os.environ.get(VAR) == expected


@pytest.mark.parametrize("deterministic", [False, True])
def test_environment_wins(monkeypatch, deterministic):
    monkeypatch.setenv(VAR, ":16:8")
    choose_cublas_workspace(cuda=True, deterministic=deterministic)
    assert os.environ[VAR] == ":16:8"
