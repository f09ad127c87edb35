"""The model on one CUDA GPU, without the CPU shim: bf16 forward + backward of the tiny preset and of a
320m-shaped 2-layer model, the SS mixer with the Triton kernel (when present) against the plain reference, and
SDPA attention against the CPU path. Skipped without CUDA.

    python -m pytest tests/gpu/test_model_gpu.py -q        # or: python tests/gpu/test_model_gpu.py
(needs the package installed: `pip install .` or a wheel built from the tree.)
"""

import time

import torch

try:
    import pytest

    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
except ImportError:  # the GPU machine may lack pytest: `python tests/gpu/test_model_gpu.py` runs the same tests
    pytest = None

from gpu_helpers import build, init_single_gpu

from transxssm_megatron.config import ModelConfig


def fwd_bwd(model, vocab, b, l, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, l + 1), device="cuda", generator=g)
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(tokens[:, :-1], None, labels=tokens[:, 1:]).mean()
    loss.backward()
    torch.cuda.synchronize()
    return float(loss), time.perf_counter() - start


def test_tiny_bf16_matches_fp32_on_gpu():
    cfg = ModelConfig.from_preset("tiny")
    ref = build(cfg, torch.float32)
    model = build(cfg, torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.copy_(q.to(p.dtype))
    loss32, _ = fwd_bwd(ref, cfg.vocab_size, 4, 512)
    loss16, secs = fwd_bwd(model, cfg.vocab_size, 4, 512)
    print(f"tiny: fp32 loss {loss32:.5f}, bf16 loss {loss16:.5f}, bf16 fwd+bwd {secs * 1e3:.1f} ms")
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_320m_shaped_two_layers_bf16():
    cfg = ModelConfig.from_preset("320m", num_layers=2, attention_period=2, attention_offset=1)
    model = build(cfg, torch.bfloat16)
    fwd_bwd(model, cfg.vocab_size, 2, 2048)  # warm-up (Triton autotune, cuDNN plans)
    model.zero_grad()
    torch.cuda.reset_peak_memory_stats()
    loss, secs = fwd_bwd(model, cfg.vocab_size, 2, 2048, seed=1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"320m-shaped 2 layers (SS + SA), b=2 l=2048 bf16: loss {loss:.4f}, fwd+bwd {secs * 1e3:.1f} ms, "
          f"peak {peak:.2f} GiB")
    assert abs(loss - 10.83) < 0.5  # ln(50304): an untrained model predicts about uniformly
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ss_mixer_kernel_matches_reference_on_gpu():
    from transxssm_kernels.rope_ssd import rope_ssd, ssd_chunked_reference

    from transxssm_megatron.model import build_transformer_config
    from transxssm_megatron.model import ss_mixer
    from transxssm_megatron.model.rope import UnifiedRope

    init_single_gpu()
    results = {}
    for name, overrides in {"transxssm": {}, "mamba2": dict(architecture="mamba2")}.items():
        cfg = ModelConfig.from_preset("320m", num_layers=2, **overrides)
        torch.manual_seed(0)
        mixer = ss_mixer.SSMixer(build_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True), cfg)
        x = torch.randn(1024, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        tables = UnifiedRope(cfg.head_dim, cfg.state_size if cfg.ss_uses_rope else None)(None, 1024, "cuda")
        chosen = ss_mixer.select_ssd(x.view(1024, 2, -1, cfg.head_dim), cfg.state_size, cfg.ss_chunk_size)
        assert chosen is (rope_ssd if rope_ssd is not None else ssd_chunked_reference)
        with torch.no_grad():
            fast = mixer(x, rope=tables).float()
            original = ss_mixer.select_ssd
            ss_mixer.select_ssd = lambda *args: ssd_chunked_reference
            try:
                slow = mixer(x, rope=tables).float()
            finally:
                ss_mixer.select_ssd = original
        err = float((fast - slow).norm() / slow.norm())
        results[name] = err
        print(f"SS mixer {name} ({'rope_ssd' if rope_ssd is not None else 'reference'} vs reference, bf16): "
              f"relative error {err:.2e}")
        assert err < 3e-2


def test_sdpa_matches_plain_attention_on_gpu():
    from transxssm_megatron.model.sa_mixer import causal_attention_reference

    q, k, v = (torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float()
    plain = causal_attention_reference(q, k, v).float()
    err = float((fused - plain).norm() / plain.norm())
    print(f"SDPA vs plain causal attention (bf16): relative error {err:.2e}")
    assert err < 2e-2


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    failures = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print(f"PASS {name}")
            except Exception as exc:  # report every test, then fail
                failures += 1
                print(f"FAIL {name}: {exc!r}")
    raise SystemExit(1 if failures else 0)
