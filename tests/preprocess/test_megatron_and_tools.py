"""megatron-core's GPTDataset reads our output (single and blended); validate catches corruption; blend; CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from preprocess_helpers import make_docs, write_jsonl

from transxssm_preprocess import build_blend, preprocess, validate_dataset
from transxssm_preprocess.blend import BlendError, to_megatron_args
from transxssm_preprocess.cli import main


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("ds")
    prefixes = []
    for name, seed in (("a", 31), ("b", 32)):
        src = write_jsonl(root / f"{name}.jsonl", make_docs(80, seed=seed, words=(20, 200)))
        preprocess([str(src)], root / name, str(tokenizer_path), progress=False)
        prefixes.append(str(root / name))
    return root, prefixes


def _gpt_datasets(blend, seq_len, tmp_path, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # GPTDataset needs only these tokenizer attributes; pad = -1 means "no pad token" (megatron's default).
    tokenizer = SimpleNamespace(vocab_size=50_280, eod=0, pad=-1, special_tokens_dict={},
                                unique_identifiers={"class": "gpt-neox-20b"})
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_len, blend=blend, split="90,5,5",
                              path_to_cache=str(tmp_path / "cache"), tokenizer=tokenizer, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def test_gpt_dataset_reads_output(two_datasets, tmp_path, tokenizer_path):
    _, (prefix, _) = two_datasets
    train, valid, _ = _gpt_datasets(build_blend([prefix]), 64, tmp_path, [40, 4, 4])
    assert len(train) >= 40 and len(valid) >= 4  # a single dataset is built in whole epochs
    all_ids = np.fromfile(prefix + ".bin", dtype=np.uint16)
    for sample in (train[0], train[17], valid[1]):
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == (64,) and np.array_equal(tokens[1:], labels[:-1])
        assert tokens.max() < 50_280
        # every sample is a window of the stored token stream (documents concatenated with EOD between them)
        window = np.concatenate([tokens, labels[-1:]]).astype(np.uint16)
        hits = np.flatnonzero(all_ids[: all_ids.size - 64] == window[0])
        assert any(np.array_equal(all_ids[h:h + 65], window) for h in hits)


def test_blend_of_two_prefixes_feeds_gpt_dataset(two_datasets, tmp_path):
    _, (a, b) = two_datasets
    blend = build_blend({a: 3, b: 1})
    assert blend == ([a, b], [0.75, 0.25])
    train, _, _ = _gpt_datasets(blend, 32, tmp_path, [200, 8, 8])
    assert len(train) == 200
    counts = np.bincount(train.dataset_index, minlength=2)  # samples drawn from each prefix
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.02)


def test_blend_spellings(two_datasets):
    _, (a, b) = two_datasets
    flat = build_blend(["30", a, "70", b])
    assert flat == ([a, b], [0.3, 0.7]) and build_blend([(a, 30), (b, 70)]) == flat
    assert build_blend([{"prefix": a, "weight": 30}, {"prefix": b, "weight": 70}]) == flat
    assert build_blend([a, b]) == ([a, b], None)
    tokens = build_blend({a: "tokens", b: "tokens"})
    stats = [json.load(open(p + ".stats.json"))["tokens"] for p in (a, b)]
    assert tokens[1] == pytest.approx([s / sum(stats) for s in stats])
    assert to_megatron_args(flat) == ["0.3", a, "0.7", b]
    with pytest.raises(BlendError, match="missing"):
        build_blend({a + "_nope": 1.0})
    with pytest.raises(BlendError, match="> 0"):
        build_blend({a: 1.0, b: -2})
    with pytest.raises(BlendError, match="every prefix or for none"):
        build_blend([(a, 1.0), (b, None)])


def test_validate_catches_corruption(two_datasets, tmp_path):
    root, (prefix, _) = two_datasets
    assert validate_dataset(prefix, vocab_size=50_280, eod_id=0, expected_documents=80)["ok"]
    data, index = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    bad = tmp_path / "bad"

    def check(bin_bytes, idx_bytes, **kw):
        (tmp_path / "bad.bin").write_bytes(bin_bytes)
        (tmp_path / "bad.idx").write_bytes(idx_bytes)
        return " | ".join(validate_dataset(bad, **kw)["problems"])

    assert "bytes" in check(data[:-2], index)  # truncated .bin
    assert "truncated" in check(data, index[:-8])  # truncated .idx
    assert "bad magic" in check(data, b"XX" + index[2:])
    ids = np.frombuffer(data, dtype=np.uint16).copy()
    ids[5] = 60_000
    assert "token id 60000 >= vocab size 50280" in check(ids.tobytes(), index, vocab_size=50_280)
    ids = np.frombuffer(data, dtype=np.uint16).copy()
    first_len = int(np.frombuffer(index[34:38], dtype=np.int32)[0])
    ids[first_len - 1] = 7  # the first document loses its EOD
    assert "do not end with EOD" in check(ids.tobytes(), index, eod_id=0)
    assert "documents, expected 81" in check(data, index, expected_documents=81)


def test_cli_help_run_validate_blend(two_datasets, tmp_path, tokenizer_path, capsys):
    for sub in ([], ["assets"], ["run"], ["validate"], ["blend"]):
        with pytest.raises(SystemExit) as e:
            main(sub + ["--help"])
        assert e.value.code == 0
    capsys.readouterr()
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(10, seed=40))
    assert main(["run", "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                 str(tokenizer_path), "--workers", "1", "--no-progress"]) == 0
    assert main(["validate", str(tmp_path / "o"), "--tokenizer", str(tokenizer_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["documents"] == 10
    (tmp_path / "o.bin").write_bytes((tmp_path / "o.bin").read_bytes()[:-2])
    assert main(["validate", str(tmp_path / "o")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "bytes" in err
    _, (a, b) = two_datasets
    assert main(["blend", "1", a, "3", b]) == 0
    assert json.loads(capsys.readouterr().out)["blend"] == [[a, b], [0.25, 0.75]]
    # the console script itself (installed by pip) exits with an error message, not a traceback, on bad input
    proc = subprocess.run([sys.executable, "-m", "transxssm_preprocess.cli", "run", "--input", str(tmp_path / "x.jsonl"),
                           "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(tokenizer_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
