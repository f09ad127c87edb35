"""The multi-tensor AdamW kernel (transxssm_kernels/adamw.py) against torch.optim.AdamW: tensors of sizes that are
and are not multiples of the kernel's block, three steps with weight decay, a gradient divisor and a skipped step.
Relative 1e-6 on the parameters and both moments (the same fp32 math; the bias corrections by exp2/log2 instead of
pow). In the Triton interpreter on CPU against torch's per-tensor loop, the bf16 copies within one bf16 step of
the parameters (the interpreter truncates where the GPU rounds to nearest); with CUDA against torch's fused kernel
(its grad_scale and found_inf), the copies equal to the parameters rounded to bf16."""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or the Triton interpreter")


def run_both(device: str, fused: bool):
    """(kernel's params, moments, copies; torch's params, moments) after three steps, the third skipped."""
    from transxssm_kernels.adamw import BLOCK, AdamWTable, adamw_step

    g = torch.Generator().manual_seed(0)
    shapes = [(37,), (BLOCK + 5,), (3, BLOCK // 2 + 1), (1,)]
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    ref = [p.clone().requires_grad_(True) for p in params]
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(ref, fused=fused, **hyper)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    copies = [torch.full(p.shape, 7.0, dtype=torch.bfloat16, device=device) for p in params]
    copies[1] = None
    table = AdamWTable()
    for step, skip in enumerate((0.0, 0.0, 1.0)):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
        scale = torch.tensor(1.5 + step, device=device)
        found_inf = torch.tensor(skip, device=device)
        for r, grad in zip(ref, grads):
            r.grad = grad.clone()
        if not skip:
            if fused:
                opt.grad_scale, opt.found_inf = scale, found_inf
            else:
                for r in ref:
                    r.grad /= scale
            opt.step()
        torch._foreach_add_(steps, 1.0)
        adamw_step(table, params, grads, m, v, steps, copies, lr=hyper["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                   weight_decay=0.1, grad_scale=scale, found_inf=found_inf)
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    torch_state = [(r.detach(), opt.state[r]["exp_avg"], opt.state[r]["exp_avg_sq"]) for r in ref]
    return params, m, v, copies, steps, torch_state


def assert_matches(params, m, v, copies, steps, torch_state, rtol: float, rounded: bool):
    for i, (p, mi, vi, (rp, rm, rv)) in enumerate(zip(params, m, v, torch_state)):
        for got, want in ((p, rp), (mi, rm), (vi, rv)):
            err = ((got - want).norm() / want.norm()).item()
            assert err < rtol, (i, err)
        if copies[i] is not None and rounded:
            assert torch.equal(copies[i], p.to(torch.bfloat16))
        elif copies[i] is not None:
            assert ((copies[i].float() - p).abs() <= p.abs() * 2.0 ** -7).all()
    assert all(float(t) == 2.0 for t in steps)   # the skipped step is not counted


def test_kernel_matches_torch_adamw():
    assert_matches(*run_both(DEVICE, fused=ON_GPU), rtol=1e-6, rounded=ON_GPU)


def test_table_follows_new_tensors():
    """A checkpoint load replaces the state tensors: the next launch must update the new ones."""
    from transxssm_kernels.adamw import AdamWTable, adamw_step

    table = AdamWTable()
    for attempt in range(2):
        p, grad = torch.ones(10, device=DEVICE), torch.ones(10, device=DEVICE)
        m, v, step = torch.zeros(10, device=DEVICE), torch.zeros(10, device=DEVICE), torch.ones((), device=DEVICE)
        adamw_step(table, [p], [grad], [m], [v], [step], [None], lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8,
                   weight_decay=0.0)
        torch.testing.assert_close(m.cpu(), torch.full((10,), 0.1))
        torch.testing.assert_close(p.cpu(), torch.full((10,), 0.9))


def test_wrong_dtype_is_refused():
    from transxssm_kernels.adamw import AdamWTable, adamw_step

    p = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous fp32"):
        adamw_step(AdamWTable(), [p], [p], [p], [p], [torch.ones(())], [None], lr=0.1, beta1=0.9, beta2=0.95,
                   eps=1e-8, weight_decay=0.0)
