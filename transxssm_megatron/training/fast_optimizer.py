"""megatron-core's optimizer step without Transformer Engine or apex, at the speed of torch's own fused kernels.

Without TE or apex, megatron-core 0.19.2 falls back to per-tensor Python loops for its multi-tensor operations:
the gradient norm takes one `torch.norm` and one host synchronisation per parameter tensor
(`local_multi_tensor_l2_norm` builds a Python list of CUDA scalars), clipping and copies launch one or two kernels
per tensor, and AdamW runs torch's multi-kernel `foreach` path. Here, in one place:

- `install_multi_tensor_ops()` swaps megatron's fallbacks for torch's foreach kernels: one norm launch for all
  gradients with no host sync, one scaling launch. Only megatron's own fallbacks are replaced; TE's or apex's
  kernels, when installed, are kept. It also gives megatron a scaling by a device tensor, with which megatron
  leaves the gradient norm on the device instead of reading it back (`get_grad_norm_fp32`).
- `use_fused_adamw(optimizer)` switches the AdamW megatron built (torch.optim.AdamW) to torch's single fused
  kernel (`fused=True`), including after a checkpoint load.
- `update_unless_nonfinite(optimizer, loss)` prepares the gradients, computes their norm once, clips and steps,
  and skips the update where the loss or the norm is NaN/inf, all decided on the device: torch's fused AdamW
  takes a `found_inf` flag and leaves parameters, moments and step count alone where it is 1, and a `grad_scale`
  tensor that it divides each gradient by as it reads it (the clipping, without a pass of its own). The host never
  waits for the GPU, so the next step's kernels queue up behind this one's (megatron's `step()` reads the norm
  back, and a skip decided on the host leaves the GPU idle while the host reads, decides and launches).
"""

from __future__ import annotations

import torch


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: (global L2 norm as a 1-element fp32 tensor, None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale (scale a float) and TE's multi_tensor_scale_tensor (scale a one-element
    device tensor, never read back): dst = src * scale for every pair (a copy when a float scale is 1)."""
    src, dst = tensor_lists
    if not src:
        return
    if torch.is_tensor(scale):
        scale = scale.reshape(())
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif not torch.is_tensor(scale) and scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_multi_tensor_ops() -> bool:
    """Replace megatron's local multi-tensor fallbacks with foreach versions, and give it a scaling by a tensor
    where it has none; True if anything was replaced."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = False
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        replaced = True
    if clip_grads.multi_tensor_scale_tensor_impl is None:
        clip_grads.multi_tensor_scale_tensor_impl = _foreach_scale
        replaced = True
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
            replaced = True
    return replaced


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def use_fused_adamw(optimizer) -> bool:
    """Turn on torch's fused AdamW (CUDA and CPU kernels) for every fp32 parameter group megatron built with
    torch.optim.AdamW/Adam; returns whether any group uses it. Existing step counters move to the parameters'
    device (fused wants them there, as fp32)."""
    fused_any = False
    for megatron_opt in _inner_optimizers(optimizer):
        inner = getattr(megatron_opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if not group["params"] or not all(p.dtype == torch.float32 for p in group["params"]):
                continue
            group["fused"], group["foreach"] = True, False
            fused_any = True
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                elif state and "step" in state:
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
    return fused_any


@torch.no_grad()
def update_unless_nonfinite(optimizer, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip every gradient by the global norm (to `config.clip_grad`) and step, unless `loss` (a device scalar)
    or that norm is NaN/inf. Returns (grad_norm, skipped) as fp32 device scalars, skipped 1.0 where the update was
    left out; nothing waits for the device where every inner optimizer is torch's fused AdamW."""
    found_inf = optimizer.prepare_grads()   # True only with an fp16 loss scaler that saw inf
    norm = torch.as_tensor(optimizer.get_grad_norm(), dtype=torch.float32, device=loss.device).reshape(())
    skipped = (torch.isfinite(loss).logical_not() | torch.isfinite(norm).logical_not() | found_inf).float()
    inner = _inner_optimizers(optimizer)
    fused = all(_fused_adam(megatron_opt) for megatron_opt in inner)
    for megatron_opt in inner:
        clip = megatron_opt.config.clip_grad
        grads = [p.grad for p in megatron_opt.get_parameters() if p.grad is not None]
        if clip <= 0.0 or not grads:
            continue
        # exactly 1 below the limit: the gradients stay bit-identical
        divisor = ((norm + 1.0e-6) / clip).clamp(min=1.0)
        if fused:   # the fused kernel divides each gradient as it reads it: no pass of its own over them
            megatron_opt.optimizer.grad_scale = divisor
        else:
            torch._foreach_div_(grads, divisor)
    if fused:
        for megatron_opt in inner:
            megatron_opt.optimizer.found_inf = skipped   # read by torch's Adam.step, honoured by the fused kernel
    try:
        if fused or not skipped.item():
            optimizer.step_with_ready_grads()
    finally:
        for megatron_opt in inner:
            for name in ("found_inf", "grad_scale"):
                if hasattr(getattr(megatron_opt, "optimizer", None), name):
                    delattr(megatron_opt.optimizer, name)
    return norm, skipped


def _fused_adam(megatron_opt) -> bool:
    inner = getattr(megatron_opt, "optimizer", None)
    if inner is None:   # a stub (a rank without parameters in this group): nothing to update
        return True
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in inner.param_groups if group["params"])
