#!/usr/bin/env bash
# GPU benchmarks of the pretraining loop (bench/train.py): 320m at l=4096 on 1 GPU, TP=2 -> PP=2 (-> PP=2 x DP=2
# on 4 GPUs) resumes over NCCL with the distributed optimizer, 1.3b at l=4096 on 1 GPU. About 7-8 minutes.
#
#   bash bench/train_gpu.sh --prepare     # here (CPU, with .venv and .assets): tokenize the embedded sample into
#                                         # .device/train_data, fetch the PyYAML wheel, record the commit
#   bash bench/train_gpu.sh OUT_DIR       # on the GPU machine, with .whl and .device carried; JSON + logs -> OUT_DIR
#
# The repository is not pip-installed on the GPU machine: megatron-core comes from the carried wheel
# (.whl/megatron_core-*.whl, unpacked into /tmp/site) and the package-dir mapping of pyproject.toml
# (transxssm_kernels -> kernels/, transxssm_preprocess -> tools/preprocess/) is rebuilt with symlinks.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .device/train_data .device/wheels
    .venv/bin/python - <<'PY'
from pathlib import Path
from transxssm_preprocess import preprocess
for subset in ("cosmopedia-v2", "fineweb-edu-dedup", "python-edu"):
    prefix = Path(".device/train_data") / subset
    if not Path(f"{prefix}.idx").is_file():
        preprocess([f".assets/sample/{subset}"], prefix, ".assets/tokenizer/gpt-neox-20b.json", overwrite=True,
                   progress=False)
    print("prepared", prefix)
PY
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pyyaml -d .device/wheels
    { git rev-parse HEAD; git status --porcelain --untracked-files=no | head -20; } > .device/COMMIT
    ls -la .device/train_data .device/wheels .whl
    echo "carry: [\".whl\", \".device\"]   then: bash bench/train_gpu.sh \$OUT"
    exit 0
fi

out=${1:?usage: bash bench/train_gpu.sh OUT_DIR   (or --prepare)}
mkdir -p "$out"
py=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0            # NVLink multicast off (see the device notes)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TRANSXSSM_COMMIT=${TRANSXSSM_COMMIT:-$(head -1 .device/COMMIT 2>/dev/null || echo unknown)}

# Import paths: megatron-core (and PyYAML if the image lacks it) from carried wheels, our packages from the tree.
if ! PYTHONPATH=/tmp/site "$py" -c "import megatron.core" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --target /tmp/site .whl/megatron_core-*.whl
fi
if ! "$py" -c "import yaml" 2>/dev/null && ! PYTHONPATH=/tmp/site "$py" -c "import yaml" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --target /tmp/site .device/wheels/*yaml*.whl
fi
map=$(mktemp -d)
ln -s "$repo/kernels" "$map/transxssm_kernels"
ln -s "$repo/tools/preprocess" "$map/transxssm_preprocess"
export PYTHONPATH="$repo:$map:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/train_gpus.txt" 2>&1 || true
"$py" bench/train.py "$out" --data .device/train_data "${@:2}"
status=$?
rm -rf "$map"
exit $status
