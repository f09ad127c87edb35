"""Shared setup of the Hugging Face tests: offline hub, one thread, and random-initialised export folders.

The shared helpers live in hf_cases.py (a conftest is not importable by name from the gloo ranks that the
conversion tests start, where `conftest` is tests/conftest.py).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The `hf` extra (transformers, safetensors, ...) is optional: without it there is nothing here to test.
if any(importlib.util.find_spec(name) is None for name in ("transformers", "safetensors")):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: a second thread only adds contention (several times slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """One random-initialised transxssm export shared by the eval, generate and NIAH tests."""
    from hf_cases import make_export

    return make_export("transxssm", tmp_path_factory.mktemp("export") / "tiny")
