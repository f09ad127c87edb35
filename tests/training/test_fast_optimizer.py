"""The foreach replacements of megatron-core's multi-tensor fallbacks (training/fast_optimizer.py) compute what the
fallbacks compute, on random tensors of mixed sizes (fp32, relative 1e-6), and with them installed megatron keeps
the gradient norm on the device. The update itself (clip, skip on the device) is checked against megatron's own
optimizer.step() in tests/training/test_loop.py."""

import torch
from megatron.core import utils

from transxssm_megatron.training import fast_optimizer


def tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in ((3,), (17, 5), (64, 33), (1,), (4, 4, 4))]


def test_l2_norm_is_the_global_norm():
    grads = tensors(0)
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = fast_optimizer._foreach_l2_norm(2048 * 32, flag, [grads], False)
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    assert ours.shape == (1,)
    torch.testing.assert_close(ours[0], expected, rtol=1e-6, atol=0)


def test_scale_in_place_copy_and_scaled_copy_match_fallback():
    for scale in (0.37, 1.0):
        src, dst, ref = tensors(1), [torch.empty_like(t) for t in tensors(1)], [torch.empty_like(t) for t in tensors(1)]
        fast_optimizer._foreach_scale(0, None, [src, dst], scale)
        utils.local_multi_tensor_scale(0, None, [src, ref], scale)
        for a, b in zip(dst, ref):
            assert torch.equal(a, b)
    same = tensors(2)
    expected = [t * 0.5 for t in same]
    fast_optimizer._foreach_scale(0, None, [same, same], 0.5)
    for a, b in zip(same, expected):
        assert torch.equal(a, b)


def test_scale_by_a_device_tensor_matches_fallback():
    scale = torch.tensor([0.37])
    src, dst, ref = tensors(3), [torch.empty_like(t) for t in tensors(3)], [torch.empty_like(t) for t in tensors(3)]
    fast_optimizer._foreach_scale(0, None, [src, dst], scale)
    utils.local_multi_tensor_scale(0, None, [src, ref], 0.37)
    for a, b in zip(dst, ref):
        assert torch.equal(a, b)
    same, expected = tensors(4), [t * 0.37 for t in tensors(4)]
    fast_optimizer._foreach_scale(0, None, [same, same], scale)
    for a, b in zip(same, expected):
        assert torch.equal(a, b)


def test_installed_megatron_norm_stays_a_tensor(monkeypatch):
    """megatron's get_grad_norm_fp32 reads the norm back (.item()) unless it has a scaling by a tensor."""
    from megatron.core.optimizer import clip_grads

    from transxssm_megatron.training.cpu_backend import install_cpu_backend

    install_cpu_backend()
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_tensor_impl", None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *args, **kwargs: None)   # one process
    grads = tensors(5)
    assert isinstance(clip_grads.get_grad_norm_fp32(grads), float)
    fast_optimizer.install_multi_tensor_ops()
    norm = clip_grads.get_grad_norm_fp32(grads)
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    assert torch.is_tensor(norm)
    torch.testing.assert_close(norm.reshape(()), expected, rtol=1e-6, atol=0)


def test_install_replaces_only_megatron_fallbacks(monkeypatch):
    from megatron.core.optimizer import clip_grads, optimizer

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_tensor_impl", None)
    sentinel = object()
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", sentinel)   # as if apex / TE provided one
    assert fast_optimizer.install_multi_tensor_ops()
    assert clip_grads.l2_norm_impl is fast_optimizer._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is fast_optimizer._foreach_scale
    assert clip_grads.multi_tensor_scale_tensor_impl is fast_optimizer._foreach_scale
    assert optimizer.multi_tensor_scale_impl is sentinel
