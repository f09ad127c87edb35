"""Shared pytest setup. The tests/ directory is put on sys.path by pytest (this conftest lives here), so test
modules import the helpers directly: `from distributed import run_distributed`.

Without CUDA, every Triton kernel runs in Triton's CPU interpreter (tests/kernels test them there at small sizes):
triton.jit decides at decoration time, so TRITON_INTERPRET is set here, before any test module imports the
kernels. With CUDA the variable is left alone (the real-size kernel tests live in tests/gpu).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_QUIET = [
    "ignore:.*Transformer Engine and Apex are not installed.*:UserWarning",
    "ignore:.*absl.logging is not installed.*:UserWarning",
    "ignore:.*Apex is not installed.*:UserWarning",
    "ignore:.*imports from `dynamic_context.py` will be removed.*:DeprecationWarning",
]


def pytest_configure(config):
    for line in _QUIET:
        config.addinivalue_line("filterwarnings", line)
