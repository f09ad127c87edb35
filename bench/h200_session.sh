#!/usr/bin/env bash
# One device call on the 4-GPU H200 machine (device kind nvidia-h200-x4; carry .whl and .device, made by
# `bash bench/train_gpu.sh --prepare`). Runs independent work side by side, one job per GPU, and packs the logs
# and JSON into OUT (the device returns at most 8 files):
#
#   bash bench/h200_session.sh checks OUT    # GPU0: tests/gpu/test_rope_ssd_gpu.py, then bench/ssd.py --variants
#                                            #   --quick (tile layouts + the 1.3B layer against (b)-(e));
#                                            # GPU1: 320m 1 GPU (+ checkpoint, resume), then 1.3b 1 GPU;
#                                            # GPUs 2,3: TP=2 -> PP=2 x VPP=2; then all four: -> PP=2 x DP=2
#   bash bench/h200_session.sh checks-x2 OUT # 2 GPUs: TP=2 -> PP=2 x VPP=2 -> DP=2 on both; then GPU0: 320m 1 GPU
#                                            #   (+ checkpoint, resume); GPU1: the kernel GPU tests, the variants
#   bash bench/h200_session.sh resume-x2 OUT # 2 GPUs: TP=2 -> PP=2 x VPP=2 -> DP=2 on both; then GPU0: 320m 1 GPU
#                                            #   (+ checkpoint, resume) then the grid's 1st half, GPU1: its 2nd half,
#                                            #   until 9 minutes have passed (each shape is saved when measured)
#   [STEPS=N ONLY_VPP=1] bash bench/h200_session.sh pp-fresh OUT  # PP=2 (x VPP=2) from scratch on 2 GPUs
#   bash bench/h200_session.sh ssd-grid OUT  # the 12 shapes of bench/ssd.py spread over the GPUs, one JSON
#   [PROFILE=chunk128] [MATCHING=TEXT] [ROUNDS=K] [FUSED_GRID=0] [LAYOUT_SECONDS=280] \
#       bash bench/h200_session.sh ssd-layouts OUT
#                                            # 1 GPU: GPU tests, the layouts of bench/ssd.py --variants (those named
#                                            #   with TEXT, K rounds) beside .device/baseline, profiles, then the
#                                            #   grid for ours and SDPA only (no mamba_ssm)
#   [NCU=0] [MATCHING=TEXT] [ROUNDS=K] bash bench/h200_session.sh ssd-tune OUT  # 1 GPU: the layouts as above
#                                            #   (no tests, no grid), then ncu on one fwd+bwd
#   bash bench/h200_session.sh ssd-source OUT  # 1 GPU: ncu --set full on one fwd+bwd; SASS + stall samples (CSV)
#   MAMBA_SHAPES=32x64x4096,... [MATCHING=TEXT] [LAYOUT_SECONDS=100] [FUSED_GRID=0] \
#       bash bench/h200_session.sh ssd-final OUT
#                                            # 1 GPU: kernel GPU tests, [layouts], the grid for ours and SDPA, then
#                                            #   every method at MAMBA_SHAPES
#   bash bench/h200_session.sh train-1gpu OUT  # 1 GPU: 1.3b training throughput
#   [REPEAT_SHAPES=HxNxL,...] bash bench/h200_session.sh ssd-repeat OUT  # 1 GPU: ours and SDPA at REPEAT_SHAPES
#                                            #   (+ host time per call, 320M-layer profile), three fresh processes
set -uo pipefail
modes="checks|checks-x2|resume-x2|pp-fresh|ssd-grid|ssd-layouts|ssd-tune|ssd-source|ssd-final|train-1gpu|ssd-repeat"
usage="usage: bash bench/h200_session.sh $modes OUT"
mode=${1:?$usage}
out=${2:?$usage}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export GIT_COMMIT=$(head -1 .device/COMMIT 2>/dev/null || echo unknown) TRANSXSSM_COMMIT=$(head -1 .device/COMMIT)
"$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron_core-*.whl || exit 1
"$py" -m zipfile -e .whl/mamba_ssm-*.whl /tmp/mb || exit 1
map=$(mktemp -d)
ln -s "$repo/kernels" "$map/transxssm_kernels"
ln -s "$repo/tools/preprocess" "$map/transxssm_preprocess"
export PYTHONPATH="$repo:$map:/tmp/site"
work=$(mktemp -d)
nvidia-smi > "$work/nvidia-smi.txt" 2>&1

gpu_tests() {   # SECONDS_LIMIT: the kernel GPU tests -> gpu-tests.txt
    timeout "$1" "$py" -m pytest tests/gpu/test_rope_ssd_gpu.py -v -s -p no:cacheprovider -o addopts="" \
        > "$work/gpu-tests.txt" 2>&1
}
layouts() {     # SECONDS_LIMIT: bench/ssd.py --variants beside .device/baseline (if there), profiles -> ssd-variants.*
    local base=()
    [ -d .device/baseline/kernels ] && base=(--baseline-kernels .device/baseline/kernels)
    timeout "$1" "$py" bench/ssd.py --variants --quick --fast "${base[@]}" --profile ${PROFILE:-default} \
        --variants-matching "${MATCHING:-}" --variants-rounds "${ROUNDS:-1}" \
        --out "$work/ssd-variants.json" > "$work/ssd-variants.log" 2>&1
}
fused_grid() {  # the 12 shapes for ours and SDPA (no mamba_ssm) -> ssd-grid-fused.*, unless FUSED_GRID=0
    [ "${FUSED_GRID:-1}" = 1 ] || return 0
    timeout 150 "$py" bench/ssd.py --fast --out "$work/ssd-grid-fused.json" > "$work/ssd-grid-fused.log" 2>&1
}

case "$mode" in
checks)
    ( export CUDA_VISIBLE_DEVICES=0
      gpu_tests 300
      timeout 300 "$py" bench/ssd.py --variants --quick --fast --mamba-path /tmp/mb --out "$work/ssd-variants.json" \
          > "$work/ssd-variants.log" 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=1 BENCH_WORK=/tmp/bench1
      bash bench/train_gpu.sh "$work/train1" --only 320m_1gpu,1.3b_1gpu > "$work/train1.log" 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=2,3 BENCH_WORK=/tmp/bench2
      bash bench/train_gpu.sh "$work/train2" --only parallel --stages tp2,pp2_vpp2 > "$work/train2.log" 2>&1 ) &
    wait
    BENCH_WORK=/tmp/bench2 bash bench/train_gpu.sh "$work/train2" --only parallel --stages pp2_dp2 --keep-work \
        >> "$work/train2.log" 2>&1
    ;;
checks-x2)
    BENCH_WORK=/tmp/bench2 bash bench/train_gpu.sh "$work/train2" --only parallel --stages tp2,pp2_vpp2,dp2 \
        > "$work/train2.log" 2>&1
    ( export CUDA_VISIBLE_DEVICES=0 BENCH_WORK=/tmp/bench1
      bash bench/train_gpu.sh "$work/train1" --only 320m_1gpu > "$work/train1.log" 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=1
      gpu_tests 150
      timeout 200 "$py" bench/ssd.py --variants --quick --fast --out "$work/ssd-variants.json" \
          > "$work/ssd-variants.log" 2>&1 ) &
    wait
    ;;
resume-x2)
    deadline=$((SECONDS + 540))
    BENCH_WORK=/tmp/bench2 bash bench/train_gpu.sh "$work/train2" --only parallel --stages tp2,pp2_vpp2,dp2 \
        > "$work/train2.log" 2>&1
    ( export CUDA_VISIBLE_DEVICES=0 BENCH_WORK=/tmp/bench1
      bash bench/train_gpu.sh "$work/train1" --only 320m_1gpu > "$work/train1.log" 2>&1
      timeout $((deadline - SECONDS)) "$py" bench/ssd.py --fast --part 1/2 --mamba-path /tmp/mb \
          --out "$work/ssd-part1.json" > "$work/ssd-part1.log" 2>&1 ) &
    CUDA_VISIBLE_DEVICES=1 timeout $((deadline - SECONDS)) "$py" bench/ssd.py --fast --part 2/2 \
        --mamba-path /tmp/mb --out "$work/ssd-part2.json" > "$work/ssd-part2.log" 2>&1 &
    wait
    ;;
pp-fresh)
    # from scratch, STEPS steps (default 80), the parallel scenario's settings: does PP=2 (x VPP=2) learn like
    # TP=2? ONLY_VPP=1 runs PP=2 x VPP=2 alone
    data="[$repo/.device/train_data/cosmopedia-v2, $repo/.device/train_data/fineweb-edu-dedup, $repo/.device/train_data/python-edu]"
    layouts=("parallel.pp=2 parallel.vpp=2" "parallel.pp=2 parallel.vpp=null")
    [ -n "${ONLY_VPP:-}" ] && layouts=("parallel.pp=2 parallel.vpp=2")
    for layout in "${layouts[@]}"; do
        name=$(echo "$layout" | tr ' =.' '___')
        timeout 110 "$py" -m torch.distributed.run --standalone --nproc-per-node=2 -m transxssm_megatron.cli train \
            --config configs/320m.yaml "data.prefixes=$data" logging.run_dir=/tmp/fresh/$name logging.tensorboard=false \
            train.seq_length=4096 model.max_seq_length=4096 train.steps=${STEPS:-80} train.micro_batch_size=2 \
            train.global_batch_size=16 train.eval_interval=0 train.eval_iters=0 logging.interval=5 \
            checkpoint.interval=0 checkpoint.save_at_end=false checkpoint.resume=none \
            parallel.use_distributed_optimizer=true parallel.tp=1 $layout 2>&1 | grep -v Warning > "$work/fresh_$name.log"
    done
    ;;
ssd-grid)
    n=$(nvidia-smi -L | wc -l)
    for k in $(seq 1 "$n"); do
        CUDA_VISIBLE_DEVICES=$((k - 1)) timeout 530 "$py" bench/ssd.py --fast --part "$k/$n" --mamba-path /tmp/mb \
            --out "$work/ssd-part$k.json" > "$work/ssd-part$k.log" 2>&1 &
    done
    wait
    "$py" - "$work" <<'PY'
import json, sys, pathlib
work = pathlib.Path(sys.argv[1])
parts = [json.loads(p.read_text()) for p in sorted(work.glob("ssd-part*.json"))]
merged = dict(parts[0], shapes=[s for p in parts for s in p["shapes"]],
              command=[p["command"] for p in parts], ceilings_per_gpu=[p["ceilings"] for p in parts])
(work / "ssd-grid.json").write_text(json.dumps(merged, indent=1))
PY
    ;;
ssd-layouts)
    # one GPU: the kernel GPU tests, then the layouts of bench/ssd.py (VARIANTS) beside the kernels of the commit in
    # .device/baseline/kernels (`git archive <commit> kernels | tar -x -C .device/baseline`), per-kernel profiles
    gpu_tests 240
    layouts "${LAYOUT_SECONDS:-280}"
    fused_grid
    ;;
ssd-tune)
    # one GPU: the layouts of bench/ssd.py --variants (beside .device/baseline), then ncu on one fused fwd+bwd
    layouts 240
    [ "${NCU:-1}" = 1 ] && timeout 200 ncu --clock-control none \
        --kernel-name regex:"dc_kernel|dxdb_kernel|chunk_output|state_scan" --launch-count 5 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats \
        "$py" bench/ssd.py --ncu-step --out "$work/unused.json" > "$work/ncu.txt" 2>&1
    ;;
ssd-source)
    # one GPU: ncu's full set on one fused fwd+bwd, then the SASS of each tile kernel with its stall samples (CSV)
    timeout 300 ncu --set full --import-source no --clock-control none \
        --kernel-name regex:"dc_kernel|dxdb_kernel|chunk_output|state_scan" --launch-count 5 -o "$work/ssd" \
        "$py" bench/ssd.py --ncu-step --out "$work/unused.json" > "$work/ncu.log" 2>&1
    ncu -i "$work/ssd.ncu-rep" --print-details all > "$work/ncu-details.txt" 2>&1
    for k in chunk_output_kernel dc_kernel dxdb_kernel; do
        ncu -i "$work/ssd.ncu-rep" --kernel-name "$k" --page source --csv --print-source sass \
            > "$work/sass-$k.csv" 2>&1
    done
    rm -f "$work/ssd.ncu-rep"
    ;;
ssd-final)
    # one GPU: the kernel GPU tests, the layouts named with MATCHING (if set) beside .device/baseline, the grid for
    # ours and SDPA, then (b)-(d) at MAMBA_SHAPES until the deadline
    deadline=$((SECONDS + 560))
    gpu_tests 150
    [ -n "${MATCHING:-}" ] && layouts "${LAYOUT_SECONDS:-100}"
    fused_grid
    timeout $((deadline - SECONDS)) "$py" bench/ssd.py --fast --mamba-path /tmp/mb --shapes "$MAMBA_SHAPES" \
        --out "$work/ssd-grid-mamba.json" > "$work/ssd-grid-mamba.log" 2>&1
    ;;
train-1gpu)
    # one GPU: 1.3b training throughput (bench/train_gpu.sh --only 1.3b_1gpu)
    BENCH_WORK=/tmp/bench1 bash bench/train_gpu.sh "$work/train1" --only 1.3b_1gpu > "$work/train1.log" 2>&1
    ;;
ssd-repeat)
    # one GPU: ours and SDPA at REPEAT_SHAPES (default: the 320M layer's), with the host time per call and the
    # kernel profile of the 320M layer, in three fresh processes: the run-to-run spread and where it comes from
    for k in 1 2 3; do
        timeout 100 "$py" bench/ssd.py --fast --shapes "${REPEAT_SHAPES:-12x128x4096,12x64x4096}" \
            --profile "320M layer" --out "$work/ssd-repeat$k.json" > "$work/ssd-repeat$k.log" 2>&1
    done
    ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
tar -C "$work" -czf "$out/logs.tar.gz" .
cp "$work"/*.json "$work"/train*/train_*.json "$out"/ 2>/dev/null
ls -la "$out"
tail -n 25 "$work"/*.log "$work"/gpu-tests.txt 2>/dev/null | cut -c1-220
