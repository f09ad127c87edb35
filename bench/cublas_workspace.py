"""The 1.3b layer's matmuls alone, eagerly and replayed from a CUDA graph: time and the kernels cuBLAS runs.

    CUBLAS_WORKSPACE_CONFIG=:0:0 python bench/cublas_workspace.py OUT.json     # one setting per process

Forward, input gradient and fp32-accumulated weight gradient (addmm into an fp32 buffer, as training's linear layers
do) of in_proj, out_proj, fc1 and fc2 at 8,192 tokens, six times each: 72 products. Prints and writes the time per
pass (eager, on a side stream, graph replay, eager again) and the kernels of one replay and one eager pass by name,
memsets included, with the date, commit, GPU, versions and the workspace setting. PyTorch reads
CUBLAS_WORKSPACE_CONFIG once per process, so each setting needs its own run; docs/performance.md compares them.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_shapes import layers  # noqa: E402
from run_record import environment  # noqa: E402

from transxssm_megatron.config import ModelConfig  # noqa: E402
from transxssm_megatron.training.wgrad_accumulation import accumulate_fp32  # noqa: E402

TOKENS = 8192
LAYERS = ("ss in_proj", "ss out_proj", "ffn fc1", "ffn fc2")
SHAPES = [(fan_in, fan_out) for name, fan_in, fan_out, _ in layers(ModelConfig.from_preset("1.3b"))
          if name in LAYERS] * 6   # (in, out)


def products(xs, ws, gs, main_grads):
    """Each layer's forward x W^T, input gradient g W and weight gradient g^T x added into its fp32 buffer."""
    outs = []
    for x, w, g, main_grad in zip(xs, ws, gs, main_grads):
        outs.append(x @ w.t())
        outs.append(g @ w)
        accumulate_fp32(x, g, main_grad)
    return outs


def ms_per_call(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_counts(fn):
    """Kernels (and memsets) of one call of fn by name (first 50 characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            names[ev.name[:50]] = names.get(ev.name[:50], 0) + 1
    return names


def main(out_path):
    torch.manual_seed(0)
    dev = "cuda"
    xs = [torch.randn(TOKENS, i, device=dev, dtype=torch.bfloat16) for i, o in SHAPES]
    ws = [torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02 for i, o in SHAPES]
    gs = [torch.randn(TOKENS, o, device=dev, dtype=torch.bfloat16) for i, o in SHAPES]
    main_grads = [torch.zeros(o, i, device=dev, dtype=torch.float32) for i, o in SHAPES]
    work = lambda: products(xs, ws, gs, main_grads)

    res = {"benchmark": "cublas-workspace", **environment(),
           "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "eager_ms": ms_per_call(work)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        res["eager_side_stream_ms"] = ms_per_call(work)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        work()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            work()
    torch.cuda.synchronize()
    res["graph_ms"] = ms_per_call(graph.replay)
    res["eager_again_ms"] = ms_per_call(work)
    res["graph_kernels"] = kernel_counts(graph.replay)
    res["eager_kernels"] = kernel_counts(work)
    print(json.dumps(res, indent=1))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/cublas_workspace.py OUT.json")
    if not torch.cuda.is_available():
        sys.exit("bench/cublas_workspace.py needs a CUDA GPU")
    main(sys.argv[1])
