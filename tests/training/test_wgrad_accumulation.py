"""Megatron's gradient accumulation fusion without apex (training/wgrad_accumulation.py) on CPU: megatron's linear
layer calling the stand-in with the arguments in the order it expects and marking the gradient as added (fp32,
against float64, relative 1e-6), install() leaving megatron alone where the fp32-output matmul is missing, and a
whole training step (linear layers, the chunked LM head and the embedding's lookup adding into main_grad; PP = 1,
PP = 2, TP = 2 with sequence parallelism) giving every parameter the main_grad of megatron's separate add. The
fp32-output matmul is CUDA-only: tests/gpu/test_fused_gpu.py checks it against float64 and
tests/gpu/test_train_gpu.py trains with it against megatron's separate add."""

import types

import pytest
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


def _main_grads_after_one_step(run_dir: str, fusion: bool, tp: int, pp: int):
    """In a gloo rank (tests/distributed.py): one step of the tiny model (2 micro-batches), with the linear layers,
    the LM head and the embedding's lookup adding weight gradients into main_grad themselves (the CPU stand-in
    above) or not (megatron's dense gradients, added by its hook); every parameter's main_grad by name."""
    from pathlib import Path

    from transxssm_megatron.training import data as data_lib, loop
    from transxssm_megatron.training.loop import Trainer
    from transxssm_megatron.training.run_config import RunConfig

    if fusion:
        loop.uses_wgrad_fusion = lambda cfg, world: True
        layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
            wgrad_gemm_accum_fp32=wgrad_accumulation.accumulate_same_dtype)
        layers._grad_accum_fusion_available = True
        torch.cuda.current_device = lambda: "cpu"   # megatron allocates its stand-in gradients there
    cfg = RunConfig.from_dict({
        "model": {"preset": "tiny", "num_layers": 8},
        "train": {"steps": 2, "seq_length": 32, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0,
                  "eval_iters": 0},
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": tp > 1},
        "optim": {"lr": 1e-3, "clip_grad": 0.0},
        "data": {"mode": "mock"},
        "checkpoint": {"resume": "none", "interval": 0, "save_at_end": False},
        "logging": {"run_dir": run_dir, "tensorboard": False}})
    trainer = Trainer(cfg)
    assert trainer.model[0].config.gradient_accumulation_fusion is fusion
    batches = trainer._data_iterators(lambda: data_lib.train_batches(trainer.datasets.train, 0, cfg, trainer.world))
    trainer.train_step(batches)
    grads = {name: p.main_grad.clone() for chunk in trainer.model for name, p in chunk.named_parameters()}
    trainer.close()
    return grads


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 1)],
                         ids=["tied-lm-head", "pp2-own-lm-head-copy", "tp2-sequence-parallel"])
def test_every_main_grad_matches_the_separate_add(tmp_path, tp, pp):
    """A whole step with gradient accumulation fusion (linear layers, the chunked LM head and the embedding lookup
    adding into main_grad) gives every parameter the main_grad of the separate add: fp32 on CPU, relative 1e-5.
    PP = 1 ties the LM head to the embedding on one stage (both add into one buffer, and the hook must add
    neither's stand-in); at PP = 2 the last stage has its own copy of the weight, whose gradient reaches megatron's
    hook as a stand-in that must not be added; TP = 2 with sequence parallelism splits the vocabulary and every
    linear layer over two ranks (the lookup masks the other rank's ids and reduce-scatters over the sequence)."""
    from distributed import run_distributed

    world = tp * pp
    separate = run_distributed(_main_grads_after_one_step, world, str(tmp_path / "separate"), False, tp, pp,
                               tp=tp, pp=pp)
    fused = run_distributed(_main_grads_after_one_step, world, str(tmp_path / "fused"), True, tp, pp, tp=tp, pp=pp)
    for rank in range(world):
        assert separate[rank].keys() == fused[rank].keys() and separate[rank]
        for name, expected in separate[rank].items():
            assert expected.abs().sum() > 0, name
            err = ((fused[rank][name] - expected).norm() / expected.norm()).item()
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
