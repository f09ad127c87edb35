"""megatron-core's optimizer step without Transformer Engine or apex, at the speed of torch's own fused kernels.

Without TE or apex, megatron-core 0.19.2 falls back to per-tensor Python loops for its multi-tensor operations:
the gradient norm takes one `torch.norm` and one host synchronisation per parameter tensor
(`local_multi_tensor_l2_norm` builds a Python list of CUDA scalars), clipping and copies launch one or two kernels
per tensor, and AdamW runs torch's multi-kernel `foreach` path. Here, in one place:

- `install_multi_tensor_ops()` swaps megatron's fallbacks for torch's foreach kernels: one norm launch for all
  gradients with no host sync, one scaling launch. Only megatron's own fallbacks are replaced; TE's or apex's
  kernels, when installed, are kept.
- `use_fused_adamw(optimizer)` switches the AdamW megatron built (torch.optim.AdamW) to torch's single fused
  kernel (`fused=True`), including after a checkpoint load.
- `clip_and_step(optimizer, grad_norm)` clips with a norm the caller already computed and steps: megatron's
  `step()` would prepare the gradients and compute the norm a second time.
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
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale for every pair (a copy when scale is 1)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_multi_tensor_ops() -> bool:
    """Replace megatron's local multi-tensor fallbacks with foreach versions; True if anything was replaced."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = False
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        replaced = True
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
            replaced = True
    return replaced


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def use_fused_adamw(optimizer) -> bool:
    """Turn on torch's fused AdamW for every CUDA parameter group megatron built with torch.optim.AdamW/Adam;
    returns whether any group uses it. Existing step counters move to the parameters' device (fused wants them
    there, as fp32)."""
    fused_any = False
    for megatron_opt in _inner_optimizers(optimizer):
        inner = getattr(megatron_opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if not group["params"] or not all(p.is_cuda and p.dtype == torch.float32 for p in group["params"]):
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
def clip_and_step(optimizer, grad_norm: float) -> bool:
    """Clip every gradient by the global norm `grad_norm` (to `config.clip_grad`) and step; returns success.
    Call after `optimizer.prepare_grads()` and `optimizer.get_grad_norm()`."""
    from megatron.core.optimizer import clip_grads

    for megatron_opt in _inner_optimizers(optimizer):
        clip = megatron_opt.config.clip_grad
        params = megatron_opt.get_parameters()
        if clip > 0.0 and params:
            clip_grads.clip_grad_by_total_norm_fp32(params, clip, grad_norm)
    return optimizer.step_with_ready_grads()
