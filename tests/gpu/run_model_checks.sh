#!/usr/bin/env bash
# Model checks on the GPU machine (real CUDA, no CPU shim): 1-GPU model tests, then TP=2 and PP=2 equivalence
# over NCCL with torchrun. Needs the package installed (`pip install .`, or a wheel built from the tree installed
# with --target DIR and DIR on PYTHONPATH).
#
#   bash tests/gpu/run_model_checks.sh            # logs and a JSON summary go to ${OUT:-/tmp/model_checks}
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/model_checks}
mkdir -p "$out"
py=${PYTHON:-python3}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
cd "$repo"

"$py" - <<'PY' | tee "$out/env.txt"
import torch, triton, megatron.core, transxssm_kernels.rope_ssd as k, transxssm_megatron
print("torch", torch.__version__, "triton", triton.__version__, "megatron-core", megatron.core.__version__)
print("gpus", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("rope_ssd (Triton) available:", k.rope_ssd is not None)
PY

status=0
echo "== 1 GPU: tests/gpu/test_model_gpu.py" | tee "$out/gpu1.log"
if "$py" -c "import pytest" 2>/dev/null; then
    "$py" -m pytest tests/gpu/test_model_gpu.py -q -s -p no:cacheprovider 2>&1 | tee -a "$out/gpu1.log"
else
    "$py" tests/gpu/test_model_gpu.py 2>&1 | tee -a "$out/gpu1.log"
fi
gpu1=${PIPESTATUS[0]}; [ "$gpu1" = 0 ] || status=1

echo "== 2 GPUs: TP=2 / PP=2 / CP=2 over NCCL" | tee "$out/nccl.log"
if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    "$py" -m torch.distributed.run --standalone --nproc-per-node 2 tests/gpu/tp_pp_nccl_check.py 2>&1 | tee -a "$out/nccl.log"
    nccl=${PIPESTATUS[0]}
else
    echo "skipped: fewer than 2 GPUs" | tee -a "$out/nccl.log"; nccl=skipped
fi
[ "$nccl" = 0 ] || [ "$nccl" = skipped ] || status=1

"$py" - "$out" "$gpu1" "$nccl" <<'PY'
import json, subprocess, sys, datetime, torch, megatron.core
out, gpu1, nccl = sys.argv[1:]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
lines = lambda name: [l for l in open(f"{out}/{name}").read().splitlines()
                      if l.startswith(("OK", "FAIL", "PASS", "tiny", "320m", "SS mixer", "SDPA", "tp/pp"))
                      or " passed" in l or " failed" in l]
summary = dict(check="model on GPU (1 GPU tests; TP=2 / PP=2 over NCCL)", date=datetime.datetime.utcnow().isoformat() + "Z",
               commit=commit, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               gpus=torch.cuda.device_count(), torch=torch.__version__, megatron_core=megatron.core.__version__,
               command="bash tests/gpu/run_model_checks.sh", gpu1_exit=gpu1, nccl_exit=nccl,
               gpu1=lines("gpu1.log"), nccl=lines("nccl.log"))
json.dump(summary, open(f"{out}/model_checks.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
exit $status
