"""Every matmul of a training step, forward and backward, gets dense operands: contiguous, or the transpose of a
contiguous matrix. Handed a strided view (rows of a wider buffer), cuBLAS picks its unaligned kernels; one such
operand, dt_proj's weight gradient at 12 heads, took 0.64 ms per SS layer on an H200 where the dense one took
19-31 us (docs/performance.md). The model here has the 320m widths (12 heads, N = 128), two layers, each
architecture; the step runs on CPU, whose products take the operands the GPU's do (the weight gradients there are
added into main_grad by addmm, here returned by mm)."""

import pytest
import torch
from distributed import run_distributed

from transxssm_megatron.config import ModelConfig

PRODUCTS = ("mm.default", "addmm.default", "addmm_.default", "addmm.out", "mm.out")


def _strided_operands(architecture: str) -> tuple[int, list]:
    from torch.utils._python_dispatch import TorchDispatchMode

    from transxssm_megatron.model import build_model, build_transformer_config

    cfg = ModelConfig.from_preset("320m", architecture=architecture, num_layers=2, attention_period=2,
                                  attention_offset=1, vocab_size=512, ss_chunk_size=16)
    model = build_model(cfg, build_transformer_config(cfg))
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    calls, strided = [0], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(str(func).endswith(name) for name in PRODUCTS):
                calls[0] += 1
                for a in args:
                    if torch.is_tensor(a) and a.dim() == 2 and not (a.is_contiguous() or a.t().is_contiguous()):
                        strided.append((str(func), tuple(a.shape), a.stride()))
            return func(*args, **(kwargs or {}))

    with Record():
        model(tokens[:, :-1], None, labels=tokens[:, 1:]).mean().backward()
    return calls[0], strided


@pytest.mark.parametrize("architecture", ["transxssm", "mamba2", "jamba", "transformer"])
def test_no_matmul_gets_a_strided_operand(architecture):
    calls, strided = run_distributed(_strided_operands, 1, architecture)[0]
    assert calls >= 12, calls   # the layers' projections, the LM head, forward and backward
    assert strided == [], strided
