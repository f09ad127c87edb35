"""megatron-core's optimizer step without Transformer Engine or apex, at the speed of torch's own fused kernels.

Without TE or apex, megatron-core 0.19.2 falls back to per-tensor Python loops for its multi-tensor operations:
the gradient norm takes one `torch.norm` and one host synchronisation per parameter tensor
(`local_multi_tensor_l2_norm` builds a Python list of CUDA scalars), clipping and copies launch one or two kernels
per tensor, and AdamW runs torch's multi-kernel `foreach` path. Here, in one place:

- `install_multi_tensor_ops()` swaps megatron's fallbacks for torch's foreach kernels: one norm launch for all
  gradients with no host sync, one scaling launch. Only megatron's own fallbacks are replaced; TE's or apex's
  kernels, when installed, are kept. It also gives megatron a scaling by a device tensor, with which megatron
  leaves the gradient norm on the device instead of reading it back (`get_grad_norm_fp32`).
- `use_fused_adamw(optimizer)` switches the AdamW megatron built (torch.optim.AdamW) to one fused kernel: on CUDA
  `transxssm_kernels.adamw` (`TritonAdamW`: one launch for all tensors, the bf16 model parameters written by the
  same pass, megatron's per-tensor copy of the main parameters skipped), else torch's (`fused=True`).
- `update_unless_nonfinite(optimizer, loss)` prepares the gradients, computes their norm once, clips and steps,
  and skips the update where the loss or the norm is NaN/inf, all decided on the device: torch's fused AdamW
  takes a `found_inf` flag and leaves parameters, moments and step count alone where it is 1, and a `grad_scale`
  tensor that it divides each gradient by as it reads it (the clipping, without a pass of its own). The host never
  waits for the GPU, so the next step's kernels queue up behind this one's (megatron's `step()` reads the norm
  back, and a skip decided on the host leaves the GPU idle while the host reads, decides and launches).
"""

from __future__ import annotations

import os

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


class TritonAdamW(torch.optim.AdamW):
    """torch's AdamW, same state and checkpoints, stepped by `transxssm_kernels.adamw`: one launch per parameter
    group that also writes each main parameter's bf16 model copy (`model_copies`: main parameter -> the bf16
    tensor megatron would copy it into). Takes torch's `grad_scale` and `found_inf` attributes as its fused path
    does. Groups the kernel does not cover (amsgrad, maximize, a tensor lr, non-contiguous tensors) take torch's
    fused step, and megatron's copy then runs as before (`wrote_model_params` False); so it does after a step in
    which some updated parameter had no entry in `model_copies`."""

    model_copies: dict
    wrote_model_params: bool = False

    def _covered(self) -> bool:
        return all(not g["amsgrad"] and not g["maximize"] and not torch.is_tensor(g["lr"]) and
                   all(p.is_cuda and p.is_contiguous() and p.grad.is_contiguous() and p.grad.dtype == torch.float32
                       for p in g["params"] if p.grad is not None) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._covered():
            self.wrote_model_params = False
            return super().step(closure)
        from transxssm_kernels.adamw import AdamWTable, adamw_step

        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        tables = self.__dict__.setdefault("_tables", {})
        wrote_all = True   # every updated parameter's model copy written: megatron's copy may be skipped
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:   # as torch's fused path starts them
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            copies = [self.model_copies.get(p) for p in params]
            wrote_all = wrote_all and all(c is not None for c in copies)
            adamw_step(tables.setdefault(i, AdamWTable()), params, [p.grad for p in params],
                       [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                       copies, lr=group["lr"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"], grad_scale=grad_scale,
                       found_inf=found_inf)
            if found_inf is not None:   # a skipped update does not count
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        self.wrote_model_params = wrote_all


def _model_copies(megatron_opt) -> dict | None:
    """main parameter -> the bf16 tensor (a view of the model parameter, this rank's shard of it under the
    distributed optimizer) that megatron's `_copy_main_params_to_model_params` copies it into; None where the
    optimizer also holds fp32 model parameters (megatron copies those too) or is of a kind not known here."""
    if hasattr(megatron_opt, "shard_fp32_from_float16_groups"):   # DistributedOptimizer
        if any(megatron_opt.model_fp32_groups):
            return None
        copies = {}
        for models, mains in zip(megatron_opt.model_float16_groups, megatron_opt.shard_fp32_from_float16_groups):
            for model, main in zip(models, mains):
                r = megatron_opt._get_model_param_range_map(model)["param"]
                copies[main] = model.detach().view(-1)[r.start:r.end]
    elif hasattr(megatron_opt, "fp32_from_float16_groups"):      # Float16OptimizerWithFloat16Params
        if any(megatron_opt.fp32_from_fp32_groups):
            return None
        copies = {main: model.detach().view(-1) for models, mains in
                  zip(megatron_opt.float16_groups, megatron_opt.fp32_from_float16_groups)
                  for model, main in zip(models, mains)}
    else:
        return None
    if not all(c.dtype == torch.bfloat16 and c.numel() == main.numel() for main, c in copies.items()):
        return None
    return copies


def _use_triton_adamw(megatron_opt) -> str:
    """Step `megatron_opt`'s AdamW with TritonAdamW where it can write the model parameters (not with
    TRANSXSSM_ADAMW=torch); returns which kernel steps it, and why where it is torch's."""
    inner = megatron_opt.optimizer
    triton_step = "one Triton launch per parameter group that also writes the bf16 parameters"
    if isinstance(inner, TritonAdamW):
        return triton_step
    params = [p for g in inner.param_groups for p in g["params"]]
    if type(inner) is not torch.optim.AdamW or not params or not all(p.is_cuda for p in params):
        return "torch's fused kernel"
    if os.environ.get("TRANSXSSM_ADAMW") == "torch":
        return "torch's fused kernel, then megatron's copy into the bf16 parameters (TRANSXSSM_ADAMW=torch)"
    try:
        import transxssm_kernels.adamw  # noqa: F401  (needs triton)
    except ImportError as e:
        return f"torch's fused kernel (transxssm_kernels.adamw: {e})"
    copies = _model_copies(megatron_opt)
    if copies is None:
        return "torch's fused kernel (the optimizer also holds fp32 model parameters)"
    inner.__class__ = TritonAdamW   # same state and param_groups: only the step changes
    inner.model_copies = copies
    copy_main_params = megatron_opt._copy_main_params_to_model_params

    def copy_unless_written():
        if inner.wrote_model_params:
            inner.wrote_model_params = False
            return
        copy_main_params()

    megatron_opt._copy_main_params_to_model_params = copy_unless_written
    return triton_step


def use_fused_adamw(optimizer) -> str:
    """Turn on a fused AdamW for every fp32 parameter group megatron built with torch.optim.AdamW/Adam: on CUDA
    TritonAdamW where it applies, else torch's fused kernels (CUDA and CPU), which TritonAdamW also falls back to.
    Returns a line for the log saying which ('' where no group uses one). Existing step counters move to the
    parameters' device (fused wants them there, as fp32)."""
    described = []
    for megatron_opt in _inner_optimizers(optimizer):
        inner = getattr(megatron_opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        fused_here = False
        for group in inner.param_groups:
            if not group["params"] or not all(p.dtype == torch.float32 for p in group["params"]):
                continue
            group["fused"], group["foreach"] = True, False
            fused_here = True
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                elif state and "step" in state:
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        if fused_here:
            described.append(_use_triton_adamw(megatron_opt))
    return "; ".join(dict.fromkeys(described))


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
