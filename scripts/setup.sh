#!/usr/bin/env bash
# Create .venv (Python >= 3.12) with the package and its test tools installed, and the offline assets
# (GPT-NeoX tokenizer, evaluation sets, sample corpus) assembled under .assets/. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    for cand in "${PYTHON:-}" python3.12 python3.13 /root/.pyenv/versions/3.12*/bin/python3 python3; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(find_python) || {
        echo "error: megatron-core 0.19.2 needs Python >= 3.12 and none was found." >&2
        echo "       Install one (e.g. 'pyenv install 3.12') or point PYTHON=/path/to/python3.12 at it." >&2
        exit 1
    }
    echo "[setup] creating .venv with $py ($("$py" --version))"
    "$py" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    echo "[setup] installing transxssm-megatron and its dependencies into .venv (first run: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev,hf]"
    rm -f .venv/.installed-*; touch "$stamp"
fi
if .venv/bin/python -c 'import transxssm_preprocess.assets' 2>/dev/null; then
    .venv/bin/transxssm-preprocess assets --out .assets
fi
echo "[setup] ready: .venv ($(.venv/bin/python --version)); \`source .venv/bin/activate\` puts transxssm on PATH"
