"""Megatron's gradient accumulation fusion without apex (training/wgrad_accumulation.py) on CPU: megatron's linear
layer calling the stand-in with the arguments in the order it expects and marking the gradient as added (fp32,
against float64, relative 1e-6), and install() leaving megatron alone where the fp32-output matmul is missing. That
matmul is CUDA-only: tests/gpu/test_fused_gpu.py checks it against float64 and tests/gpu/test_train_gpu.py trains
with it against megatron's separate add."""

import types

import torch
from megatron.core.tensor_parallel import layers

from transxssm_megatron.training import wgrad_accumulation


def test_megatron_linear_accumulates_into_main_grad_through_the_stand_in(monkeypatch):
    # The stand-in's same-dtype function in place of the CUDA-only fp32 one: the same contract, runnable on CPU.
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_accumulation.accumulate_same_dtype), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")   # megatron allocates its dummy gradient there
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(5, 8))
    weight.main_grad, weight.grad_added_to_main_grad = torch.randn(5, 8), False
    expected = weight.main_grad.double().clone()
    for _ in range(2):   # two micro-batches
        y = layers.linear_with_grad_accumulation_and_async_allreduce(x, weight, None, True, False, False)
        g = torch.randn_like(y)
        y.backward(g)
        expected += g.reshape(-1, 5).double().t() @ x.detach().reshape(-1, 8).double()
    assert weight.grad_added_to_main_grad
    err = (weight.main_grad.double() - expected).norm() / expected.norm()
    assert err < 1e-6, err
    assert x.grad is not None and x.grad.abs().sum() > 0   # the input gradient is still formed


def test_install_needs_the_fp32_output_matmul(monkeypatch):
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.setattr(wgrad_accumulation, "supported", lambda: False)
    assert wgrad_accumulation.install() is False
    assert layers._grad_accum_fusion_available is False
    monkeypatch.setattr(wgrad_accumulation, "supported", lambda: True)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    assert wgrad_accumulation.install() is True
    assert layers._grad_accum_fusion_available is True
    assert layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32 is wgrad_accumulation.accumulate_fp32


def test_apex_module_is_kept(monkeypatch):
    apex_like = types.SimpleNamespace(wgrad_gemm_accum_fp32=None)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex_like, raising=False)
    assert wgrad_accumulation.install() is True
    assert layers.fused_weight_gradient_mlp_cuda is apex_like
