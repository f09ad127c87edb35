"""Shared fixtures for the preprocessing tests: the offline tokenizer and small corpora with known documents."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"

@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.is_file():
        pytest.fail(f"{TOKENIZER} is missing: run `bash scripts/setup.sh` (it runs "
                    "`transxssm-preprocess assets --out .assets`) before the tests", pytrace=False)
    return TOKENIZER


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path))
