"""AdamW over many fp32 tensors in one Triton launch, writing each updated parameter's bf16 model copy as it goes.

Why not torch's fused AdamW alone: megatron then copies every fp32 main parameter into its bf16 model parameter,
one copy kernel per tensor, which reads all the main parameters again. Here every program takes `BLOCK` elements
of one tensor from a table built once (tensor addresses, sizes, the block-to-tensor map), one launch covers all
tensors, and the bf16 copy is stored from the registers that hold the new parameter (30 bytes per parameter in
all). On an H200 (bench/optimizer_step.py, the 1.3b model's 236 tensors, 1.29B parameters) torch's AdamW and
the copies take 13.5 ms per step (AdamW alone 11.1), this kernel 10.8 ms (3.6 TB/s) with 2,048-element blocks
and 4 warps; 4,096 x 8 warps took 11.5, 16,384 x 16 warps 14.3.

The update is torch's AdamW (decoupled weight decay, no amsgrad), in the same order of operations as torch's fused
kernel: g = grad / grad_scale; p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with t each tensor's own step count (an fp32 device
scalar, as torch's fused path keeps it). A `found_inf` device flag of 1 leaves everything as it was, without the
host reading it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048     # elements per program
WARPS = 4
# a row of the tensor table (int64 x 8): the addresses of param, grad, exp_avg, exp_avg_sq, step and the bf16 model
# copy (0: none), the size, one unused column


@triton.jit
def _pointer(address, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = address.to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _update(row, offs, size, grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, HAS_SCALE: tl.constexpr,
            MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """One block of one tensor. Unmasked (whole blocks) and with addresses known to be 16-byte aligned (ALIGNED),
    the loads and stores are 16-byte vectors: an address read from memory tells the compiler nothing about its
    alignment, and a mask against a size read from memory none about where it changes. Masked-off lanes load
    nothing and store nothing."""
    if MASKED:
        mask = offs < size
    else:
        mask = None
    p_ptr = _pointer(tl.load(row + 0), tl.float32, ALIGNED)
    g_ptr = _pointer(tl.load(row + 1), tl.float32, ALIGNED)
    m_ptr = _pointer(tl.load(row + 2), tl.float32, ALIGNED)
    v_ptr = _pointer(tl.load(row + 3), tl.float32, ALIGNED)
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
    out = tl.load(row + 5)
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = g / tl.load(grad_scale_ptr)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    bias1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
    p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if out != 0:
        tl.store(_pointer(out, tl.bfloat16, ALIGNED) + offs, p.to(tl.bfloat16, fp_downcast_rounding="rtne"),
                 mask=mask)


@triton.jit
def adamw_kernel(table_ptr, block_tensor_ptr, block_index_ptr, grad_scale_ptr, found_inf_ptr, lr, beta1, beta2, eps,
                 weight_decay, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):
    if HAS_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 8
    first = tl.load(block_index_ptr + pid).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    size = tl.load(row + 6)
    if first + BLOCK <= size:
        _update(row, offs, size, grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, HAS_SCALE, False, ALIGNED)
    else:
        _update(row, offs, size, grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, HAS_SCALE, True, ALIGNED)


class AdamWTable:
    """The launch tables of one list of tensors, rebuilt only when an address or a size changes (a checkpoint
    load replaces the optimizer's state tensors)."""

    def __init__(self, block: int = BLOCK):
        self.block, self.key = block, None
        self.table = self.block_tensor = self.block_index = None

    def update(self, rows: list[tuple[int, ...]], device: torch.device) -> None:
        key = tuple(rows)
        if key == self.key:
            return
        sizes = torch.tensor([r[6] for r in rows], dtype=torch.int64)
        blocks = (sizes + self.block - 1) // self.block
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.block_tensor = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), blocks).to(device)
        starts = torch.repeat_interleave(torch.cumsum(blocks, 0) - blocks, blocks)
        self.block_index = (torch.arange(int(blocks.sum())) - starts).to(torch.int32).to(device)
        self.key = key


def adamw_step(table: AdamWTable, params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
               model_copies: list[torch.Tensor | None], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, warps: int = WARPS) -> None:
    """One AdamW update of every (param, grad, exp_avg, exp_avg_sq) in place, all fp32, contiguous and on one CUDA
    device; `steps` are the tensors' step counts (fp32 device scalars) after this step's increment, and
    `model_copies` bf16 tensors of the same sizes that receive the new parameters (None where there is none).
    `grad_scale` divides every gradient; `found_inf` == 1 skips the update (both one-element fp32 tensors). The
    launch: `table`'s block of elements per program, `warps` per program."""
    rows = []
    for p, g, m, v, t, out in zip(params, grads, exp_avgs, exp_avg_sqs, steps, model_copies, strict=True):
        for x in (p, g, m, v):
            if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != p.numel():
                raise ValueError("adamw_step: param, grad and moments must be contiguous fp32 tensors of one size")
        if out is not None and (out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() != p.numel()):
            raise ValueError("adamw_step: a model copy must be a contiguous bf16 tensor of its parameter's size")
        rows.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), t.data_ptr(),
                     0 if out is None else out.data_ptr(), p.numel(), 0))
    if not rows:
        return
    table.update(rows, params[0].device)
    dummy = table.table
    aligned = all(address % 16 == 0 for r in rows for address in r[:6])
    adamw_kernel[(table.block_tensor.numel(),)](
        table.table, table.block_tensor, table.block_index,
        dummy if grad_scale is None else grad_scale, dummy if found_inf is None else found_inf,
        lr, beta1, beta2, eps, weight_decay, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        ALIGNED=aligned, BLOCK=table.block, num_warps=warps)
