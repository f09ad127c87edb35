"""Blended GPTDataset construction from preprocessed prefixes (no process group needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / ".assets"
SUBSETS = ("cosmopedia-v2", "python-edu")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    from transxssm_preprocess import preprocess

    out = tmp_path_factory.mktemp("blend")
    result = []
    for subset in SUBSETS:
        prefix = out / subset
        preprocess([str(ASSETS / "sample" / subset)], prefix, str(ASSETS / "tokenizer" / "gpt-neox-20b.json"),
                   progress=False)
        result.append(prefix)
    return result


def _config(run_dir: Path, prefixes, seq_length: int) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"preset": "tiny", "max_seq_length": seq_length},
        "train": {"steps": 4, "seq_length": seq_length, "micro_batch_size": 1, "global_batch_size": 1},
        "data": {"prefixes": [str(p) for p in prefixes], "split": "95,5,0"},
        "logging": {"run_dir": str(run_dir), "tensorboard": False},
    })


def test_unweighted_blend_weights_prefixes_by_token_count(prefixes):
    names, weights = data_lib._blend(prefixes, None)
    tokens = [json.loads(Path(f"{p}.stats.json").read_text())["tokens"] for p in prefixes]
    assert names == [str(p) for p in prefixes]
    assert weights == [float(t) for t in tokens]
    assert data_lib._blend(prefixes, [0.3, 0.7])[1] == [0.3, 0.7]


def test_long_sequences_build_even_when_a_valid_split_holds_less_than_one_sequence(prefixes, tmp_path):
    # At l=4096 the 5% validation split of cosmopedia-v2 (3,207 tokens) is shorter than one sequence: megatron's
    # size-weighted blend would give it weight 0 and assert inside BlendedDataset (seen on the GPU machine).
    # The valid split as a whole (with python-edu's 25,261 tokens) holds a sample, which check_data requires.
    cfg = _config(tmp_path, prefixes, seq_length=4096)
    sets = data_lib.build_datasets(cfg, None, num_train_samples=8, num_valid_samples=2)
    assert len(sets.train) >= 8 and len(sets.valid) >= 2
    sample = sets.valid[0]
    assert sample["tokens"].shape == (4096,) and int(sample["tokens"].max()) < 50_304


def test_valid_prefixes_hold_out_whole_files(prefixes, tmp_path):
    # cosmopedia-v2 trains, python-edu validates: each split reads its own file, all of it.
    train_prefix, valid_prefix = prefixes
    cfg = RunConfig.from_dict({
        "model": {"preset": "tiny", "max_seq_length": 256},
        "train": {"steps": 4, "seq_length": 256, "micro_batch_size": 1, "global_batch_size": 1, "eval_iters": 2},
        "data": {"prefixes": [str(train_prefix)], "valid_prefixes": [str(valid_prefix)]},
        "logging": {"run_dir": str(tmp_path), "tensorboard": False},
    })
    sets = data_lib.build_datasets(cfg, None, num_train_samples=8, num_valid_samples=4)
    assert sets.train.dataset.path_prefix == str(train_prefix)
    assert sets.valid.dataset.path_prefix == str(valid_prefix)
    tokens = lambda prefix: json.loads(Path(f"{prefix}.stats.json").read_text())["tokens"]
    # all of each file: the split's documents span the whole prefix (with split 95,5,0 they would be a share)
    for split, prefix in ((sets.train, train_prefix), (sets.valid, valid_prefix)):
        ids = split.document_index
        assert set(ids.tolist()) == set(range(len(split.dataset)))
        assert int(split.dataset.sequence_lengths.sum()) == tokens(prefix)


def test_valid_prefixes_errors(prefixes, tmp_path):
    from transxssm_megatron.config import ConfigError

    base = {"model": {"preset": "tiny"}, "train": {"seq_length": 256}, "logging": {"run_dir": str(tmp_path), "tensorboard": False}}
    with pytest.raises(ConfigError, match="data.valid_prefixes: a prefix is also in data.prefixes"):
        RunConfig.from_dict({**base, "data": {"prefixes": [str(prefixes[0])], "valid_prefixes": [str(prefixes[0])]}})
    cfg = RunConfig.from_dict({**base, "train": {"seq_length": 256, "eval_iters": 1},
                               "data": {"prefixes": [str(prefixes[0])], "valid_prefixes": [str(tmp_path / "none")]}})
    with pytest.raises(ConfigError, match="^data.valid_prefixes: "):
        data_lib.check_data(cfg)
