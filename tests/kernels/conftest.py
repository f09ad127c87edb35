"""Run the Triton kernels of kernels/transxssm_kernels/rope_ssd/chunk.py through Triton's CPU interpreter in this directory's tests.

triton.jit decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be set before
chunk.py is imported; test_chunk.py reloads the kernel modules if something imported them earlier without it.
On a machine with CUDA the variable is left alone (the real-size tests live in tests/gpu).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
