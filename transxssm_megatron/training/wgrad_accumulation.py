"""Weight gradients added into megatron's fp32 `main_grad` by the matmul itself, without apex.

megatron-core's `gradient_accumulation_fusion` has every column/row-parallel linear add its weight gradient into
`param.main_grad` in one cuBLAS call (beta = 1, fp32 output), through apex's `fused_weight_gradient_mlp_cuda`.
Without apex, megatron forms each micro-batch's weight gradient in bf16 and the DDP hook adds it to the fp32 buffer:
one more kernel that reads and writes every gradient per micro-batch (5.4 of 146 ms of GPU time per 1.3b
micro-batch on an H200) and every micro-batch's gradient rounded to bf16 before it is summed. torch's
`addmm(..., out_dtype=torch.float32)` is the same cuBLAS call, so `install()` hands megatron a two-function stand-in
for the apex module. apex's own module, when installed, is kept.
"""

from __future__ import annotations

import types

import torch


def accumulate_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (out, in; fp32) += grad_output (tokens, out)^T @ total_input (tokens, in), summed in fp32."""
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def accumulate_same_dtype(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a main_grad in the operands' dtype (gradients not reduced in fp32)."""
    main_grad.addmm_(grad_output.t(), total_input)


def supported() -> bool:
    """A CUDA device and a torch whose matmuls take out_dtype (bf16 operands, fp32 result)."""
    return torch.cuda.is_available() and hasattr(torch.ops.aten.addmm, "dtype_out")


def install() -> bool:
    """Make megatron's `gradient_accumulation_fusion` usable; True when it is (apex's module or this stand-in).
    Call before the model's linear layers are built: they check at construction."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not supported():
        return False
    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=accumulate_fp32, wgrad_gemm_accum_fp16=accumulate_same_dtype)
    layers._grad_accum_fusion_available = True
    return True
