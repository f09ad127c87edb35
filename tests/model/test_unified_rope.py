"""Unified RoPE (model.md §1): the tables, relative-position invariance of the SS and SA mixers and of the whole model,
and the mixers computing exactly what their docstrings say (against plain references built from the weights)."""

import math

import pytest
import torch
from distributed import run_distributed

from transxssm_megatron.config import ModelConfig
from transxssm_megatron.model.rope import UnifiedRope, rope_table

L, B = 40, 2


def mixer_cfg(**overrides) -> ModelConfig:
    base = dict(num_layers=2, attention_period=2, attention_offset=1, vocab_size=1000, ffn_hidden_size=256,
                ss_chunk_size=16)
    return ModelConfig.from_preset("tiny", **{**base, **overrides})


def test_rope_table_definition_and_sharing():
    pos = torch.tensor([0, 1, 5, 4095])
    cos, sin = rope_table(pos, 64, 10000.0)
    theta = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(cos, torch.cos(pos[:, None].double() * theta).float())
    torch.testing.assert_close(sin, torch.sin(pos[:, None].double() * theta).float())
    assert cos.dtype == torch.float32 and cos.shape == (4, 32)
    same = UnifiedRope(64, 64)(None, 8, "cpu")
    assert same.state is same.attention                       # N == head dim: one table, shared
    other = UnifiedRope(64, 128)(torch.arange(8).expand(3, 8), 8, "cpu")
    assert other.attention[0].shape == (3, 8, 32) and other.state[0].shape == (3, 8, 64)
    assert UnifiedRope(64, None)(None, 8, "cpu").state is None


def _build_mixers(**overrides):
    from transxssm_megatron.model import build_transformer_config
    from transxssm_megatron.model.sa_mixer import SelfAttentionMixer
    from transxssm_megatron.model.ss_mixer import SSMixer

    cfg = mixer_cfg(**overrides)
    tc = build_transformer_config(cfg)
    return cfg, SSMixer(tc, cfg), SelfAttentionMixer(tc, cfg)


def _shift_invariance():
    torch.manual_seed(3)
    cfg, ss, sa = _build_mixers(state_size=128)  # N != head dim: a second table
    rope = UnifiedRope(cfg.head_dim, cfg.state_size)
    x = torch.randn(L, B, cfg.hidden_size)
    base = rope(None, L, "cpu")
    shifted = rope(torch.arange(L).expand(B, L) + torch.tensor([[1000], [37]]), L, "cpu")  # per-row offsets
    scaled = rope(torch.arange(L).expand(B, L) * 2, L, "cpu")                                  # not a shift
    out = {}
    with torch.no_grad():
        for name, mixer in (("ss", ss), ("sa", sa)):
            out[name] = [mixer(x, rope=tables) for tables in (base, shifted, scaled)]
        ss.use_rope = False
        out["ss_none"] = ss(x, rope=base)
    return out


def test_mixers_are_invariant_to_a_position_shift_and_rope_is_applied():
    out = run_distributed(_shift_invariance, 1)[0]
    for name in ("ss", "sa"):
        base, shifted, scaled = out[name]
        scale = base.abs().max()
        assert scale > 0
        torch.testing.assert_close(shifted, base, atol=2e-5 * scale, rtol=1e-4)    # relative positions only
        assert (scaled - base).abs().max() > 1e-2 * scale, f"{name}: positions have no effect"
    base = out["ss"][0]
    change = float((out["ss_none"] - base).norm() / base.norm())
    assert change > 1e-2, f"RoPE on B/C changes the SS output by only {change:.2e} (fp32 noise is ~1e-6)"


def _model_shift():
    from transxssm_megatron.model import build_model, build_transformer_config

    torch.manual_seed(0)
    cfg = mixer_cfg(num_layers=2)
    model = build_model(cfg, build_transformer_config(cfg))
    ids = torch.randint(0, 1000, (B, L))
    with torch.no_grad():
        return model(ids, None), model(ids, torch.arange(L).expand(B, L) + 4096)


def test_whole_model_logits_are_shift_invariant():
    base, shifted = run_distributed(_model_shift, 1)[0]
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)


def rotate_full(t, cos_half, sin_half):
    """Textbook rotate_half RoPE on the last dim, written independently of the model code."""
    cos = torch.cat([cos_half, cos_half], -1)
    sin = torch.cat([sin_half, sin_half], -1)
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-t2, t1], -1) * sin


def _mixers_vs_reference(overrides):
    from transxssm_kernels.rope_ssd import ssd_naive

    torch.manual_seed(5)
    cfg, ss, sa = _build_mixers(**overrides)
    rope = UnifiedRope(cfg.head_dim, cfg.state_size)
    tables = rope(None, L, "cpu")
    x = torch.randn(L, B, cfg.hidden_size)
    with torch.no_grad():
        got_ss, got_sa = ss(x, rope=tables), sa(x, rope=tables)

        # SS: in_proj rows group by group = [x (h_g P) | B (N) | C (N)], dt_proj one row per head, then
        # SSD(softplus(dt), A=-exp(A_log))
        H, P, N, G = cfg.num_attention_heads, cfg.head_dim, cfg.state_size, cfg.ss_groups
        hg = H // G
        u = (x.transpose(0, 1).double() @ ss.in_proj.weight.double().T).reshape(B, L, G, hg * P + 2 * N)
        xs, Bm, Cm = u.split([hg * P, N, N], dim=-1)
        dt = x.transpose(0, 1).double() @ ss.dt_proj.weight.double().T
        cos, sin = tables.state
        y = ssd_naive(xs.reshape(B, L, H, P), dt.reshape(B, L, H), -torch.exp(ss.A_log.double()), Bm, Cm,
                      dt_softplus=True, rope_cos=cos.double(), rope_sin=sin.double())
        want_ss = (y.reshape(B, L, H * P) @ ss.out_proj.weight.double().T).transpose(0, 1)

        # SA: linear_qkv rows per KV group = [q | k | v], RoPE on q and k, causal softmax(q k^T / 8) v
        qkv = (x.transpose(0, 1) @ sa.linear_qkv.weight.T).reshape(B, L, H, 3, P)
        q, k, v = qkv.unbind(dim=3)
        cos, sin = tables.attention
        q, k = rotate_full(q, cos[:, None], sin[:, None]), rotate_full(k, cos[:, None], sin[:, None])
        att = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=True)
        want_sa = (att.transpose(1, 2).reshape(B, L, H * P) @ sa.linear_proj.weight.T).transpose(0, 1)
    return got_ss, want_ss.float(), got_sa, want_sa


@pytest.mark.parametrize("overrides", [dict(), dict(state_size=128, ss_groups=1)], ids=["N64-G=H", "N128-G1"])
def test_mixers_compute_their_definition(overrides):
    got_ss, want_ss, got_sa, want_sa = run_distributed(_mixers_vs_reference, 1, overrides)[0]
    assert want_ss.abs().max() > 0 and want_sa.abs().max() > 0
    torch.testing.assert_close(got_ss, want_ss, atol=1e-5 * float(want_ss.abs().max()), rtol=1e-4)
    torch.testing.assert_close(got_sa, want_sa, atol=1e-5, rtol=1e-4)
    assert math.isfinite(float(got_ss.sum()))
