"""ModelConfig: presets, YAML round trip, architecture defaults, and bad configurations failing at start with a
message naming the field (before any megatron object is built)."""

import pytest
import yaml

from transxssm_megatron.config import ConfigError, ModelConfig


def test_presets_match_spec_table():
    for name, (d, layers, heads, n, ffn) in {"tiny": (128, 8, 2, 64, 384), "320m": (768, 24, 12, 128, 3584),
                                             "1.3b": (2048, 24, 32, 128, 4096)}.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.state_size, cfg.ffn_hidden_size) == \
            (d, layers, heads, n, ffn)
        assert cfg.head_dim == 64 and cfg.ss_groups == heads and cfg.num_query_groups == heads
        assert cfg.padded_vocab_size == 50304
    cfg = ModelConfig.from_preset("320m")
    assert [i for i, k in enumerate(cfg.layer_kinds()) if k == "sa"] == [7, 15, 23]
    assert (cfg.ss_positional, cfg.ss_conv1d, cfg.ss_d_skip, cfg.ss_z_gate, cfg.ss_dt_bias) == \
        ("rope", False, False, False, False)


def test_baseline_defaults():
    m = ModelConfig.from_preset("tiny", architecture="mamba2")
    assert (m.ss_positional, m.ss_conv1d, m.ss_d_skip, m.ss_z_gate, m.ss_dt_bias) == ("conv1d_d", True, True, True, True)
    assert set(m.layer_kinds()) == {"ss"}
    assert set(ModelConfig.from_preset("tiny", architecture="transformer").layer_kinds()) == {"sa"}
    j = ModelConfig.from_preset("320m", architecture="jamba")
    assert j.layer_kinds() == ModelConfig.from_preset("320m").layer_kinds() and not j.ss_uses_rope
    ablation = ModelConfig.from_preset("tiny", ss_positional="conv1d_d")
    assert ablation.ss_conv1d and ablation.ss_d_skip and not ablation.ss_z_gate


def test_yaml_round_trip_and_model_section(tmp_path):
    cfg = ModelConfig.from_preset("320m", num_layers=8, ss_positional="none", num_query_groups=4)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(path) == cfg
    path.write_text(yaml.safe_dump({"model": {"preset": "1.3b", "num_layers": 4}, "train": {"lr": 1}}))
    loaded = ModelConfig.from_yaml(path)
    assert loaded.hidden_size == 2048 and loaded.num_layers == 4


@pytest.mark.parametrize("values, field", [
    (dict(preset="tiny", ss_stat_size=64), "ss_stat_size"),
    (dict(preset="2b"), "preset"),
    (dict(preset="tiny", architecture="rwkv"), "architecture"),
    (dict(preset="tiny", ss_positional="alibi"), "ss_positional"),
    (dict(preset="tiny", state_size=63), "state_size"),
    (dict(preset="tiny", hidden_size=129), "hidden_size"),
    (dict(preset="tiny", ss_groups=3), "ss_groups"),
    (dict(preset="tiny", num_query_groups=3), "num_query_groups"),
    (dict(preset="tiny", ss_positional="conv1d_d", ss_conv1d=False), "ss_conv1d"),
    (dict(preset="tiny", num_layers=0), "num_layers"),
    (dict(preset="tiny", init_std=0), "init_std"),
    (dict(preset="tiny", rope_base="10k"), "rope_base"),
])
def test_bad_config_names_the_field(values, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        ModelConfig.from_dict(values)


def test_odd_state_size_is_fine_without_rope():
    assert ModelConfig.from_preset("tiny", state_size=63, ss_positional="none").state_size == 63


@pytest.mark.parametrize("preset, tp, pp, field", [
    ("320m", 8, 1, "num_attention_heads"),       # 12 heads over 8 ranks
    ("tiny", 4, 1, "num_attention_heads"),
    ("320m", 1, 5, "num_layers"),
])
def test_validate_against_parallel_layout(preset, tp, pp, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        ModelConfig.from_preset(preset).validate(tp=tp, pp=pp)


def test_groups_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"^ss_groups:"):
        ModelConfig.from_preset("1.3b", ss_groups=2).validate(tp=4)
    ModelConfig.from_preset("1.3b").validate(tp=8, pp=4)


def test_builder_validates_before_building():
    from transxssm_megatron.model import build_transformer_config

    with pytest.raises(ConfigError, match=r"^num_attention_heads:"):
        build_transformer_config(ModelConfig.from_preset("320m"), tp=8)
