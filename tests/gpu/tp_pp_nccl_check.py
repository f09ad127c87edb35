"""TP=2, PP=2 and CP=2 equivalence on 2 GPUs over NCCL (real CUDA, no CPU shim). Run with

    torchrun --nproc-per-node 2 tests/gpu/tp_pp_nccl_check.py

1. Reference: TP=1, PP=1 on each rank (same seed, CPU-initialised weights, fp32, TF32 off): logits, per-token
   loss, gradients, and loss + gradients through megatron's schedule with 2 micro-batches.
2. TP=2 (each rank one half): the reference weights sliced by megatron's partition attributes; gathered logits,
   loss and gradients are compared with the reference. Done for transxssm and transformer, then transxssm
   with sequence parallelism.
3. PP=2 through megatron's 1F1B schedule: loss and gradients (tied embedding: sum of the two stage copies).
4. CP=2 (each rank one half of the sequence, all-to-alls inside the mixers): logits and loss gathered over the
   sequence, gradients summed over the two ranks (as DDP's reduction does), for every case.
Prints the max relative errors and exits non-zero on a mismatch (rank 0 decides; tolerance TOL).
Without CUDA it runs the same logic over gloo with the test-only CPU shim (to check the script itself).
"""

import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "model"))  # model_parallel_utils (shared with the CPU tests)
CUDA = torch.cuda.is_available()
if not CUDA:
    from transxssm_megatron.training.cpu_backend import install_cpu_backend

    install_cpu_backend()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from model_parallel_utils import full_grads, load_full_weights  # noqa: E402

from transxssm_megatron.config import ModelConfig  # noqa: E402
from transxssm_megatron.model import build_model, build_transformer_config  # noqa: E402

# Relative tolerances (max |diff| / max |ref|). fp32 with TF32 off in torch; the Triton SSD kernel uses TF32 dots
# and may autotune differently for H and H/2 heads, so allow ~1e-3-level drift. A wrong shard layout is O(1).
TOL = {"logits": 5e-3, "loss": 5e-3, "losses": 5e-3, "grads": 2e-2}
B, L = 2, int(os.environ.get("CHECK_SEQ_LEN", 512))


# name -> (architecture, overrides). jamba-4heads: 2 heads per B/C and KV group on each rank, and every SS option
# (conv1d, D, z-gate + grouped norm, dt_bias) sharded.
CASES = {"transxssm": ("transxssm", {}), "transformer": ("transformer", {}),
         "jamba-4heads-G2-gqa": ("jamba", dict(num_attention_heads=4, ss_groups=2, num_query_groups=2))}


def cfg_for(case):
    architecture, overrides = CASES[case]
    return ModelConfig.from_preset("tiny", architecture=architecture, num_layers=4, attention_period=2,
                                   attention_offset=1, **overrides)


def batch(n_micro=1):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50277, (n_micro, B, L + 1), generator=g).cuda()
    return ids[..., :-1], ids[..., 1:]


def init(tp, pp, cp=1):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def make(case, weights, tp=1, pp=1, cp=1, **overrides):
    cfg = cfg_for(case)
    torch.manual_seed(0)
    tc = build_transformer_config(cfg, tp=tp, pp=pp, cp=cp, use_cpu_initialization=True, batch_p2p_sync=CUDA,
                                  **overrides)
    model = build_model(cfg, tc).cuda()
    if weights is not None:
        load_full_weights(model, weights)
    return model


def direct(model):
    ids, labels = batch()
    logits = model(ids[0], None, runtime_gather_output=True)
    loss = model(ids[0], None, labels=labels[0])
    loss.mean().backward()
    return dict(logits=logits.detach().float().cpu(), loss=loss.detach().float().cpu(), grads=full_grads(model))


def direct_cp(model):
    """direct() with this CP rank's block of the sequence: outputs gathered along it, gradients summed over CP."""
    group = parallel_state.get_context_parallel_group()
    cp, r = group.size(), group.rank()
    ids, labels = batch()
    block = slice(r * L // cp, (r + 1) * L // cp)
    logits = model(ids[0][:, block], None, runtime_gather_output=True)
    loss = model(ids[0][:, block], None, labels=labels[0][:, block])
    (loss.sum() / (B * L)).backward()                                   # the whole sequence's mean
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)

    def gathered(t):
        parts = [torch.empty_like(t) for _ in range(cp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=1).detach().float().cpu()

    return dict(logits=gathered(logits), loss=gathered(loss), grads=full_grads(model))


def scheduled(model):
    ids, labels = batch(2)

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        out = model(x, None, labels=y)
        return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(zip(ids, labels)),
                                         model=[model], num_microbatches=2, seq_length=L, micro_batch_size=B)
    return dict(losses=torch.tensor([float(d["loss"]) for d in losses]), grads=full_grads(model))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(label, got, want, report):
    worst = {k: rel(got[k], want[k]) for k in want if k != "grads" and k in got}
    assert set(got["grads"]) == set(want["grads"]), f"{label}: parameter sets differ"
    worst["grads"] = max(rel(got["grads"][k], want["grads"][k]) for k in want["grads"])
    report[label] = worst


def main():
    rank = int(os.environ["RANK"])
    if CUDA:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if CUDA else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {}

    init(1, 1)
    refs, weights = {}, {}
    for arch in CASES:
        model = make(arch, None)
        weights[arch] = {k: v.detach().clone() for k, v in model.named_parameters()}
        refs[arch] = direct(model)
    model = make("transxssm", weights["transxssm"])
    refs["pp"] = scheduled(model)

    init(2, 1)
    for arch in CASES:
        compare(f"tp2-{arch}", direct(make(arch, weights[arch], tp=2)), refs[arch], report)
    sp_model = make("transxssm", weights["transxssm"], tp=2, sequence_parallel=True)
    compare("tp2-sp-transxssm", direct(sp_model), refs["transxssm"], report)

    init(1, 2)
    staged = scheduled(make("transxssm", weights["transxssm"], pp=2))
    gathered = [None, None]
    dist.all_gather_object(gathered, staged)
    if rank == 0:
        merged = {"losses": gathered[1]["losses"], "grads": {}}
        for part in gathered:
            for k, g in part["grads"].items():
                merged["grads"][k] = merged["grads"][k] + g if k in merged["grads"] else g
        compare("pp2-transxssm", merged, refs["pp"], report)

    init(1, 1, cp=2)
    for arch in CASES:
        compare(f"cp2-{arch}", direct_cp(make(arch, weights[arch], cp=2)), refs[arch], report)

    ok = True
    if rank == 0:
        for label, errors in report.items():
            bad = {k: v for k, v in errors.items() if not v <= TOL[k]}
            ok &= not bad
            print(f"{'OK  ' if not bad else 'FAIL'} {label}: " +
                  ", ".join(f"max rel err {k} {v:.2e}" for k, v in errors.items()), flush=True)
        print(f"tp/pp/cp NCCL check: {'PASSED' if ok else 'FAILED'} (tolerance {TOL})", flush=True)
    flag = torch.tensor([int(ok)], device="cuda" if CUDA else "cpu")
    dist.broadcast(flag, 0)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    sys.exit(0 if flag.item() else 1)


if __name__ == "__main__":
    main()
