"""Broken datasets stop `transxssm train` (and `transxssm-preprocess validate`) with one line naming the file, the
fault and the command that rebuilds it, before any training step; the check is the same code for both."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from transxssm_megatron.cli import main as train_main
from transxssm_megatron.config import ConfigError
from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training.run_config import RunConfig
from transxssm_preprocess.cli import main as preprocess_main
from transxssm_preprocess.indexed import INDEX_MAGIC, write_index

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"
DTYPE_CODE_OFFSET = len(INDEX_MAGIC) + 8  # after the magic and the u64 version


def _corrupt(name: str, bin_bytes: bytes, idx_bytes: bytes) -> tuple[bytes, bytes]:
    """A good pair's bytes -> the bytes of one kind of broken pair."""
    if name == "garbage_idx":
        return bin_bytes, random.Random(0).randbytes(len(idx_bytes))
    if name == "truncated_idx":
        return bin_bytes, idx_bytes[:-8]
    if name == "empty_bin":
        return b"", idx_bytes
    if name == "truncated_bin":
        return bin_bytes[: len(bin_bytes) // 2], idx_bytes
    if name == "bin_longer_than_index":
        return bin_bytes + bytes(64), idx_bytes
    if name == "wrong_dtype_code":
        return bin_bytes, idx_bytes[:DTYPE_CODE_OFFSET] + bytes([99]) + idx_bytes[DTYPE_CODE_OFFSET + 1:]
    raise ValueError(name)


# case -> (file at fault: "bin" | "idx" | "prefix", words the message must hold)
CASES = {
    "garbage_idx": ("idx", "not a megatron .idx file (bad magic header)"),
    "truncated_idx": ("idx", "truncated"),
    "empty_bin": ("bin", "empty: 0 bytes"),
    "truncated_bin": ("bin", "truncated"),
    "bin_longer_than_index": ("bin", "longer than its index says"),
    "wrong_dtype_code": ("idx", "unknown dtype code 99"),
    "zero_documents": ("prefix", "empty dataset (0 documents, 0 tokens)"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A sound prefix made by `transxssm-preprocess run` (so PREFIX.stats.json names its input and tokenizer)."""
    if not TOKENIZER.is_file():
        pytest.fail(f"{TOKENIZER} is missing: run `bash scripts/setup.sh` first", pytrace=False)
    root = tmp_path_factory.mktemp("good")
    src = root / "corpus.jsonl"
    rng = random.Random(1)
    words = "the model reads tokens from an indexed dataset while the optimizer waits".split()
    src.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(30, 90)))}) + "\n"
                           for _ in range(60)))
    assert preprocess_main(["run", "--input", str(src), "--output-prefix", str(root / "good"), "--tokenizer",
                            str(TOKENIZER), "--workers", "1", "--no-progress"]) == 0
    return root / "good", src


def _broken(good, case: str, tmp_path: Path) -> Path:
    prefix, _ = good
    out = tmp_path / "broken"
    if case == "zero_documents":  # a well-formed pair that holds nothing
        _write_dataset(out, [])
    else:
        bin_bytes, idx_bytes = _corrupt(case, Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes())
        Path(f"{out}.bin").write_bytes(bin_bytes)
        Path(f"{out}.idx").write_bytes(idx_bytes)
    shutil.copy(f"{prefix}.stats.json", f"{out}.stats.json")  # the rebuild command comes from it
    return out


def _write_dataset(prefix: Path, lengths: list[int]) -> Path:
    """A pair of documents of ``lengths`` tokens (random ids, no stats.json), written with numpy."""
    lengths = np.asarray(lengths, dtype=np.int64)
    np.random.default_rng(0).integers(1, 50_000, int(lengths.sum()), dtype=np.uint16).tofile(f"{prefix}.bin")
    write_index(f"{prefix}.idx", np.uint16, lengths)
    return prefix


def _train(prefix: Path, run_dir: Path, *overrides: str) -> int:
    return train_main(["train", "--config", str(REPO / "configs/tiny.yaml"), f"data.prefixes=[{prefix}]",
                       f"logging.run_dir={run_dir}", "logging.tensorboard=false", "train.steps=2",
                       "checkpoint.resume=none", *overrides])


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _assert_no_step(run_dir: Path) -> None:
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_refuses_a_broken_dataset_before_the_first_step(good, case, tmp_path, capsys):
    prefix = _broken(good, case, tmp_path)
    rc = _train(prefix, tmp_path / "run")
    _, err = capsys.readouterr()
    line = _error_line(err)
    at_fault, words = CASES[case]
    named = str(prefix) if at_fault == "prefix" else f"{prefix}.{at_fault}"
    assert rc == 2 and line.startswith(f"error: data.prefixes: {named}") and words in line, line
    _, src = good
    assert (f"Rebuild it: transxssm-preprocess run --input {src} --output-prefix {prefix} --tokenizer {TOKENIZER}"
            in line), line
    assert not (tmp_path / "run").exists()  # stopped in the preflight, before the run folder or a process group


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_fails_on_the_same_broken_dataset(good, case, tmp_path, capsys):
    prefix = _broken(good, case, tmp_path)
    assert preprocess_main(["validate", str(prefix)]) == 1
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert out == "" and CASES[case][1] in line and "Rebuild it: transxssm-preprocess run --input" in line


def test_a_sound_dataset_passes_both_checks(good, tmp_path, capsys):
    prefix, _ = good
    assert preprocess_main(["validate", str(prefix), "--tokenizer", str(TOKENIZER)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    cfg = _config([prefix], tmp_path, seq_length=64, split="90,10,0")
    (summary,) = data_lib.check_data(cfg)
    assert summary.documents == 60 and summary.tokens == json.loads(Path(f"{prefix}.stats.json").read_text())["tokens"]


def _config(prefixes, run_dir: Path, seq_length: int, split: str, eval_iters: int = 4) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"preset": "tiny", "max_seq_length": seq_length},
        "train": {"steps": 2, "seq_length": seq_length, "micro_batch_size": 1, "global_batch_size": 1,
                  "eval_iters": eval_iters},
        "data": {"prefixes": [str(p) for p in prefixes], "split": split},
        "logging": {"run_dir": str(run_dir), "tensorboard": False},
    })


# case -> (document lengths, data.split, what the message says, the fix it offers); train.seq_length=256, so a
# split needs 257 tokens for one sample
SPLIT_CASES = {
    "train_shorter_than_one_sample": ([40] * 4, "95,5,0", "the train split of", "a shorter train.seq_length"),
    "valid_shorter_than_one_sample": ([100] * 40, "95,5,0", "the valid split of", "train.eval_iters=0"),
    "valid_without_documents": ([300] * 10, "98,2,0", "no valid tokens (0 of its 10 documents)",
                                "train.eval_iters=0"),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_training_refuses_a_split_too_small_for_one_sample(case, tmp_path, capsys):
    lengths, split, words, fix = SPLIT_CASES[case]
    prefix = _write_dataset(tmp_path / "small", lengths)
    rc = _train(prefix, tmp_path / "run", f"data.split={split}", "train.seq_length=256", "train.eval_iters=4")
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error: data.split:") and str(prefix) in line, line
    assert words in line and fix in line, line
    _assert_no_step(tmp_path / "run")


def test_valid_split_is_not_needed_without_validation(tmp_path):
    prefix = _write_dataset(tmp_path / "small", [100] * 40)
    data_lib.check_data(_config([prefix], tmp_path, seq_length=256, split="95,5,0", eval_iters=0))
    with pytest.raises(ConfigError, match="the valid split of"):
        data_lib.check_data(_config([prefix], tmp_path, seq_length=256, split="95,5,0", eval_iters=4))


def test_check_of_a_100_mb_index_takes_well_under_a_second(tmp_path):
    """8 M documents (a 100 MB .idx): the check memory-maps the arrays, never builds megatron objects."""
    lengths = np.full(8_000_000, 3, dtype=np.int64)
    write_index(tmp_path / "big.idx", np.uint16, lengths)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)  # sparse: the check reads only its size
    assert (tmp_path / "big.idx").stat().st_size > 100e6
    started = time.monotonic()
    (summary,) = data_lib.check_prefixes([tmp_path / "big"])
    assert summary.tokens == 24_000_000 and time.monotonic() - started < 1.0
