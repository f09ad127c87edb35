"""Run config, command-line overrides, fail-fast errors and the FLOP formula (fast: no training here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from transxssm_megatron.cli import main
from transxssm_megatron.config import ConfigError, ModelConfig
from transxssm_megatron.training.loop import describe_speed_paths, overlapped_communication, speed_hint
from transxssm_megatron.training.metrics import layer_forward_flops_per_token, train_flops_per_token
from transxssm_megatron.training.parallel import World, uses_cuda_graph
from transxssm_megatron.training.run_config import RunConfig, parse_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_overrides_are_parsed_with_types():
    nested = parse_overrides(["train.steps=100", "optim.lr=3e-4", "train.deterministic=true",
                              "data.prefixes=[a/b, c/d]", "data.weights=null", "model.num_layers=16"])
    assert nested == {"train": {"steps": 100, "deterministic": True}, "optim": {"lr": "3e-4"},
                      "data": {"prefixes": ["a/b", "c/d"], "weights": None}, "model": {"num_layers": 16}}
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", ["train.steps=100", "optim.lr=3e-4", "model.num_layers=16",
                                                      "data.prefixes=[a/b, c/d]", "train.deterministic=true"])
    assert cfg.train.steps == 100 and cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.num_layers == 16 and cfg.data.prefixes == ["a/b", "c/d"] and cfg.train.deterministic is True
    assert cfg.model.hidden_size == 128  # the rest of the preset is kept


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", "train.stpes: unknown option (did you mean 'steps'?)"),
    ("trian.steps=5", "trian: unknown config section (did you mean 'train'?)"),
    ("model.hiden_size=64", "model.hiden_size: unknown model option"),
    ("train.steps=many", "train.steps: expected int, got 'many'"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("train.precision=fp8", "train.precision: 'fp8'; choose auto, bf16 or fp32"),
    ("parallel.tp=3", "num_attention_heads: 2 heads are not divisible by tensor parallel size 3"),
    ("data.mode=gpt", None),
    ("steps=5", "expected section.key=value"),
    ("data.split=90,10", "data.split: '90,10'; expected three proportions"),
])
def test_bad_values_are_rejected_by_name(override, message):
    if message is None:  # a valid override as a control: the config loads
        RunConfig.load(REPO / "configs/tiny.yaml", [override])
        return
    with pytest.raises(ConfigError) as err:
        RunConfig.load(REPO / "configs/tiny.yaml", [override])
    assert message in str(err.value)


def test_recompute_layers_are_checked_against_a_pipeline_stage():
    load = lambda *o: RunConfig.load(REPO / "configs/tiny.yaml", list(o))   # 8 decoder layers
    assert load("train.recompute=true", "train.recompute_layers=8").train.recompute_layers == 8
    with pytest.raises(ConfigError, match="train.recompute_layers: needs train.recompute=true"):
        load("train.recompute_layers=2")
    with pytest.raises(ConfigError, match="train.recompute_layers: 5; give 1 to 4, the decoder layers of a pipeline"):
        load("train.recompute=true", "train.recompute_layers=5", "parallel.pp=2")
    with pytest.raises(ConfigError, match="train.recompute_layers: 0; give 1 to 8"):
        load("train.recompute=true", "train.recompute_layers=0")


def test_overlap_param_gather_needs_its_partners():
    load = lambda *o: RunConfig.load(REPO / "configs/tiny.yaml", list(o))
    both = ("parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")
    assert load(*both).parallel.overlap_param_gather is True
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather: needs parallel.use_distributed_optimizer"):
        load("parallel.overlap_param_gather=true")
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather: needs parallel.use_distributed_optimizer"):
        load(*both, "parallel.use_distributed_optimizer=false")
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather: a CUDA graph replay skips the hooks"):
        load(*both, "train.cuda_graph=true")



def _world(device: str, dp: int, cp: int = 1) -> World:
    """Rank 0 of dp x cp data- and context-parallel ranks (no TP, PP) on `device`; no process group needed."""
    return World(rank=0, world_size=dp * cp, local_rank=0, device=torch.device(device), tp=1, pp=1, vpp=None, dp=dp,
                 cp=cp)


@pytest.mark.parametrize("device, dp, cp, gradients, parameters", [
    ("cuda", 2, 1, True, True), ("cuda", 1, 2, True, True),   # data- or context-parallel ranks to talk to
    ("cuda", 1, 1, False, False),                               # one rank: nothing to overlap
    ("cpu", 2, 1, True, False),                                 # no distributed optimizer on CPU: no gather
])
def test_overlap_is_on_where_there_is_something_to_overlap(device, dp, cp, gradients, parameters):
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", ["parallel.overlap_grad_reduce=true",
                                                      "parallel.overlap_param_gather=true"])
    world = _world(device, dp, cp)
    assert overlapped_communication(cfg, world) == {"overlap_grad_reduce": gradients,
                                                    "overlap_param_gather": parameters}
    line = describe_speed_paths(cfg, world)
    assert ("gradient reduce" in line) == gradients and ("parameter all-gather" in line) == parameters


@pytest.mark.parametrize("device, world_size, overrides, graph", [
    ("cuda", 1, [], True),                                        # the default on one GPU
    ("cuda", 2, [], False), ("cpu", 1, [], False),                # more GPUs, or none
    ("cuda", 1, ["train.fused=false"], False), ("cuda", 1, ["train.recompute=true"], False),
    ("cuda", 1, ["train.deterministic=true"], False),
    ("cuda", 1, ["train.cuda_graph=false"], False),               # the user's choice wins either way
    ("cuda", 2, ["train.cuda_graph=true"], True),
    ("cuda", 1, ["train.recompute=true", "train.cuda_graph=true"], True),
])
def test_the_cuda_graph_is_on_by_default_for_one_gpu_only(device, world_size, overrides, graph):
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", overrides)
    world = _world(device, world_size)
    assert uses_cuda_graph(cfg, world) == graph
    assert ("replayed as a CUDA graph" in describe_speed_paths(cfg, world)) == graph


def test_the_speed_line_names_the_conv_kernels_where_they_run(monkeypatch):
    monkeypatch.delenv("TRANSXSSM_CONV_KERNELS", raising=False)
    mamba2 = RunConfig.load(REPO / "configs/tiny.yaml", ["model.architecture=mamba2"])
    transxssm = RunConfig.load(REPO / "configs/tiny.yaml", [])
    assert "causal conv1d in its Triton kernels" in describe_speed_paths(mamba2, _world("cuda", 1))
    assert "conv1d" not in describe_speed_paths(transxssm, _world("cuda", 1))
    assert "conv1d" not in describe_speed_paths(mamba2, _world("cpu", 1))
    monkeypatch.setenv("TRANSXSSM_CONV_KERNELS", "0")
    assert "causal conv1d compiled (TRANSXSSM_CONV_KERNELS=0)" in describe_speed_paths(mamba2, _world("cuda", 1))
    assert "conv1d" not in describe_speed_paths(transxssm, _world("cuda", 1))
    monkeypatch.delenv("TRANSXSSM_CONV_KERNELS")
    width3 = RunConfig.load(REPO / "configs/tiny.yaml", ["model.architecture=mamba2", "model.ss_conv_width=3"])
    assert "causal conv1d compiled (width 3; the kernels take 4)" in describe_speed_paths(width3, _world("cuda", 1))


@pytest.mark.parametrize("overrides, hinted", [
    ([], False), (["train.recompute=true"], True), (["train.deterministic=true"], True),
    (["train.cuda_graph=false"], False), (["train.fused=false"], False)])
def test_one_gpu_runs_left_without_the_graph_by_another_option_are_told_of_it(overrides, hinted):
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", overrides)
    assert (speed_hint(cfg, _world("cuda", 1)) is not None) == hinted
    assert speed_hint(cfg, _world("cuda", 2)) is None and speed_hint(cfg, _world("cpu", 1)) is None


def test_batch_layout_errors_name_the_fields():
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", ["train.global_batch_size=12", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="train.global_batch_size: 12 is not a multiple of micro_batch_size"):
        cfg.num_microbatches(world_size=1)
    cfg = RunConfig.load(REPO / "configs/tiny.yaml", ["parallel.pp=2"])
    with pytest.raises(ConfigError, match="tp\\*pp = 2 does not divide the world size 3"):
        cfg.data_parallel_size(3)
    assert cfg.num_microbatches(world_size=4) == 1  # dp 2, micro 8, global 16


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = RunConfig.load(path)
    cfg.save(tmp_path / "config.yaml")
    again = RunConfig.load(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    if path.stem != "tiny":  # the recipe of docs/model.md §7
        o = cfg.optim
        assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad) == (0.9, 0.999, 1e-8, 0.01, 1.0)
        assert (o.warmup_fraction, o.min_lr_ratio) == (0.1, 0.1)
        tokens = cfg.train.global_batch_size * cfg.train.seq_length
        assert tokens == (2**20 if "320m" in path.stem else 2**21)
        assert o.lr == (3e-4 if "320m" in path.stem else 2e-4)


def test_missing_files_fail_fast_with_what_to_do(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    # A missing dataset prefix is reported before any process group or model exists.
    rc = main(["train", "--config", str(REPO / "configs/tiny.yaml"), f"data.prefixes=[{tmp_path}/corpus]",
               f"logging.run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path}/corpus.bin does not exist" in err and "transxssm-preprocess run" in err
    rc = main(["train", "--config", str(REPO / "configs/tiny.yaml"), "data.mode=mock",
               f"logging.run_dir={tmp_path}/run", "--resume", str(tmp_path / "ckpt")])
    assert rc == 2 and "checkpoint.resume:" in capsys.readouterr().err


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--config", str(REPO / "configs/320m.yaml"), "train.steps=7", "parallel.tp=2"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 7 and out["parallel"]["tp"] == 2
    assert out["model"]["hidden_size"] == 768 and out["model"]["ss_positional"] == "rope"


def test_flop_formula_matches_the_parameter_count():
    """Matmul FLOPs = 2 x weights touched per token; the rest is the sequence mixing (attention, SSD)."""
    for arch in ("transformer", "transxssm", "mamba2"):
        m = ModelConfig.from_preset("320m", architecture=arch)
        l = 4096
        d, h, p, n, g, i = 768, 12, 64, 128, 12, 3584
        per = layer_forward_flops_per_token(m, l)
        assert per["ffn"] == 2 * 3 * d * i
        assert per["sa"] == 2 * 4 * d * d + 2 * l * d  # QKV + out, plus QK^T and AV over the causal half
        z = h * p if m.ss_z_gate else 0
        conv = 2 * 4 * (h * p + 2 * g * n) if m.ss_conv1d else 0
        ssd = 2 * h * (128 * (n + p) + 2 * n * p)  # chunk 256: causal half 128
        assert per["ss"] == 2 * d * (h * p + 2 * g * n + h + z) + 2 * h * p * d + ssd + conv
        kinds = m.layer_kinds()
        total = 3 * (sum(per[k] + per["ffn"] for k in kinds) + per["head"])
        assert math.isclose(train_flops_per_token(m, l), total)
    # The hybrid does less work per token than the Transformer at long context (attention grows with l).
    hybrid = train_flops_per_token(ModelConfig.from_preset("320m"), 16384)
    transformer = train_flops_per_token(ModelConfig.from_preset("320m", architecture="transformer"), 16384)
    assert hybrid < transformer


def test_config_overlays_its_base(tmp_path):
    """`base: FILE` reads FILE first and overlays this file key by key (sections merge, values replace); a missing
    base and a base that leads back to the file are one-line errors naming the file."""
    from transxssm_megatron.config import ConfigError

    (tmp_path / "a.yaml").write_text("model: {preset: tiny}\ntrain: {steps: 7, seq_length: 64}\n"
                                     "data: {mode: mock}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 9}\nmodel: {architecture: jamba}\n")
    cfg = RunConfig.load(tmp_path / "b.yaml")
    assert (cfg.train.steps, cfg.train.seq_length, cfg.model.architecture, cfg.model.hidden_size) == \
        (9, 64, "jamba", 128)
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: nowhere\.yaml names no file"):
        RunConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        RunConfig.load(tmp_path / "d.yaml")


@pytest.mark.parametrize("arch", ["transformer", "mamba2", "jamba"])
@pytest.mark.parametrize("size", ["320m", "1.3b"])
def test_baseline_configs_are_their_size_with_another_architecture(arch, size):
    base = RunConfig.load(REPO / "configs" / f"{size}.yaml").to_dict()
    variant = RunConfig.load(REPO / "configs" / f"{arch}_{size}.yaml").to_dict()
    assert variant["model"]["architecture"] == arch
    assert variant["logging"]["run_dir"] == f"runs/{arch}_{size}"
    for section in ("parallel", "train", "optim", "data", "checkpoint"):
        assert variant[section] == base[section], section


@pytest.mark.parametrize("device, workspace, said", [
    ("cuda", ":0:0", "cuBLAS without a workspace"), ("cuda", None, "cuBLAS with PyTorch's default workspace"),
    ("cuda", ":4096:8", "cuBLAS workspace :4096:8"), ("cpu", ":0:0", None),
])
def test_the_speed_line_names_cublas_workspace(monkeypatch, device, workspace, said):
    if workspace is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", workspace)
    line = describe_speed_paths(RunConfig.load(REPO / "configs/tiny.yaml", []), _world(device, 1))
    assert (said in line) if said else ("cuBLAS" not in line)
