"""Every architecture and SS positional mode (model.md §2, §8) builds, runs forward + backward with a gradient for
every parameter, and a few Adam steps lower the loss on a fixed batch."""

import pytest
import torch
from distributed import run_distributed

from transxssm_megatron.config import ModelConfig

VARIANTS = {
    "transxssm-rope": dict(architecture="transxssm"),
    "transxssm-conv1d_d": dict(architecture="transxssm", ss_positional="conv1d_d"),
    "transxssm-none": dict(architecture="transxssm", ss_positional="none"),
    "transxssm-N128-G1-noskipweights": dict(architecture="transxssm", state_size=128, ss_groups=1,
                                            residual_weights=False),
    "mamba2": dict(architecture="mamba2"),
    "mamba2-rope": dict(architecture="mamba2", ss_positional="rope"),
    "mamba2-none": dict(architecture="mamba2", ss_positional="none"),
    "jamba": dict(architecture="jamba"),
    "transformer": dict(architecture="transformer"),
    "transformer-gqa": dict(architecture="transformer", num_query_groups=1),
}


def _train_a_little(overrides):
    from transxssm_megatron.model import build_model, build_transformer_config

    cfg = ModelConfig.from_preset("tiny", num_layers=2, attention_period=2, attention_offset=1, vocab_size=512,
                                  ffn_hidden_size=256, ss_chunk_size=16, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg, build_transformer_config(cfg))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (2, 49), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, missing = [], []
    for step in range(6):
        optimizer.zero_grad()
        loss = model(ids, None, labels=labels).mean()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        optimizer.step()
        losses.append(float(loss))
    no_decay = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                       if getattr(p, "no_weight_decay", False)})
    return dict(losses=losses, missing=missing, no_decay=no_decay,
                names=[n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_architecture_trains(overrides):
    result = run_distributed(_train_a_little, 1, overrides)[0]
    losses = result["losses"]
    assert result["missing"] == [], f"parameters without gradient: {result['missing']}"
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    names = result["names"]
    ss_layers = overrides["architecture"] != "transformer"
    assert any(n.endswith("mixer.A_log") for n in names) == ss_layers
    assert any(n.endswith("mixer.linear_qkv.weight") for n in names) == (overrides["architecture"] != "mamba2")
    assert ("skip_weight" in result["no_decay"]) == overrides.get("residual_weights", True)
    if ss_layers:
        assert "A_log" in result["no_decay"]
        cfg = ModelConfig.from_preset("tiny", **overrides)
        assert any(n.endswith("conv1d_weight") for n in names) == cfg.ss_conv1d
        assert any(n.endswith("mixer.D") for n in names) == cfg.ss_d_skip
        assert any(n.endswith("gate_norm_weight") for n in names) == cfg.ss_z_gate
        assert any(n.endswith("dt_bias") for n in names) == cfg.ss_dt_bias


def _grads_with_recompute(recompute):
    """Gradients of one step and the bytes autograd saved outside recomputed sub-layers; recompute: None (off), "all"
    or the number of decoder layers recomputed (megatron's "block" method)."""
    from transxssm_megatron.model import build_model, build_transformer_config
    from transxssm_megatron.training.loop import recompute_settings

    cfg = ModelConfig.from_preset("tiny", num_layers=2, attention_period=2, attention_offset=1, vocab_size=512,
                                  ffn_hidden_size=256, ss_chunk_size=16)
    extra = {} if recompute is None else recompute_settings(None if recompute == "all" else recompute)
    torch.manual_seed(0)
    model = build_model(cfg, build_transformer_config(cfg, **extra))
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_activation_recompute_gives_the_same_gradients_and_saves_less():
    """Every sub-layer recomputed, or only the first decoder layer (SS mixer + FFN) of two: the same gradients, and
    autograd keeps fewer activations the more is recomputed."""
    plain, plain_bytes = run_distributed(_grads_with_recompute, 1, None)[0]
    block, block_bytes = run_distributed(_grads_with_recompute, 1, 1)[0]
    full, full_bytes = run_distributed(_grads_with_recompute, 1, "all")[0]
    for name in plain:
        torch.testing.assert_close(block[name], plain[name], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(full[name], plain[name], atol=1e-7, rtol=1e-5)
    assert plain_bytes > block_bytes > full_bytes


def _init_stats(depth_scaled):
    from transxssm_megatron.model import build_model, build_transformer_config

    cfg = ModelConfig.from_preset("tiny", num_layers=2, attention_period=2, attention_offset=1, vocab_size=512,
                                  depth_scaled_init=depth_scaled, architecture="jamba")
    torch.manual_seed(0)
    model = build_model(cfg, build_transformer_config(cfg))
    return {n: (float(p.float().std()) if p.dim() == 2 else None, float(p.min()), float(p.max()))
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("depth_scaled", [False, True])
def test_initialization(depth_scaled):
    stats = run_distributed(_init_stats, 1, depth_scaled)[0]
    out_std = 0.02 / (2 * 2) ** 0.5 if depth_scaled else 0.02
    for name, (std, lo, hi) in stats.items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")):
            assert abs(std - out_std) < 0.1 * out_std, (name, std)
        elif std is not None:                                   # embedding, in_proj, linear_qkv, linear_fc1
            assert abs(std - 0.02) < 0.002, (name, std)
        elif leaf in ("skip_weight", "weight", "D", "gate_norm_weight"):  # norms, skip weights, D: ones
            assert lo == hi == 1.0, name
        elif leaf == "A_log":                                   # A = -exp(A_log), A_log = log U[1, 16]
            assert 0.0 <= lo and hi <= torch.log(torch.tensor(16.0)), name
        elif leaf == "dt_bias":                                 # softplus(dt_bias) in [1e-3, 1e-1]
            smallest, largest = torch.nn.functional.softplus(torch.tensor([lo, hi])).tolist()
            assert 1e-3 * 0.999 <= smallest and largest <= 0.1 * 1.001, name
