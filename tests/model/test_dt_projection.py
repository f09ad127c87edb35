"""dt_proj with its input gradient added into in_proj's in place (model/dt_projection.py) against plain autograd
through both projections: d x, d W_in, d W_dt in float64 (1e-12), the weight gradient added into a pre-filled
main_grad, a join that would drop the gradient raising instead, and dense operands for every product."""

import pytest
import torch

from transxssm_megatron.model.dt_projection import project_dt


def _grads(use_join: bool, into_main_grad: bool, heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w_dt = torch.randn(heads, 16, generator=g, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(heads, 16, generator=g, dtype=torch.float64)
    if into_main_grad:
        w_dt.main_grad = prior.clone()
    if use_join:
        x_in, dt = project_dt(x, w_dt, into_main_grad)
    else:
        x_in, dt = x, x @ w_dt.t()
    proj = x_in @ w_in.t()
    loss = (proj * torch.randn(proj.shape, generator=g, dtype=torch.float64)).sum() \
        + (dt.transpose(0, 1) ** 2).sum()          # dt's gradient reaches the projection through a transpose
    loss.backward()
    dw_dt = w_dt.main_grad - prior if into_main_grad else w_dt.grad
    return x.grad, w_in.grad, dw_dt, w_dt


@pytest.mark.parametrize("heads", [12, 8], ids=["padded-to-16", "aligned"])
@pytest.mark.parametrize("into_main_grad", [False, True])
def test_joined_input_gradient_matches_autograd(into_main_grad, heads):
    *got, w_dt = _grads(True, into_main_grad, heads)
    *want, _ = _grads(False, False, heads)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert getattr(w_dt, "grad_added_to_main_grad", False) == into_main_grad


def test_join_without_dt_gradient_raises():
    x = torch.randn(5, 2, 8, requires_grad=True)
    x_in, dt = project_dt(x, torch.randn(3, 8, requires_grad=True), False)
    with pytest.raises(RuntimeError, match="before dt_proj's"):
        x_in.sum().backward()      # dt unused: its gradient never comes, the join must not pass on a partial one


@pytest.mark.parametrize("into_main_grad", [False, True])
def test_every_product_gets_dense_operands(into_main_grad):
    """With 12 heads padded to 16, no matmul forward or backward is handed a strided view (the live 12 columns of
    the padded 16): from one, cuBLAS ran its slowest kernel on an H200, 20-30x the time of the dense operand."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
                torch.ops.aten.bmm.default}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                seen.extend(a for a in args if torch.is_tensor(a) and a.dim() == 2)
            return func(*args, **(kwargs or {}))

    with Record():
        _grads(True, into_main_grad, heads=12)
    assert len(seen) >= 6   # forward, the joined input gradient and the weight gradient, two operands each
    for t in seen:
        assert t.is_contiguous() or t.t().is_contiguous(), (tuple(t.shape), t.stride())
