"""Process group and megatron parallel state set-up, for torchrun, srun, or a plain single process.

    world = setup(cfg)      # -> World(rank, world_size, local_rank, device, dp, ...)
    ...
    teardown()

Rank discovery, in order: torchrun's RANK/WORLD_SIZE/LOCAL_RANK; SLURM's SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID (one task per GPU under `srun`); otherwise a single process. MASTER_ADDR/MASTER_PORT must be set
for more than one process (our SLURM launchers derive them from the node list); a single process defaults
to 127.0.0.1 and a free port. Backend: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from transxssm_megatron.config import ConfigError
from transxssm_megatron.training.cpu_backend import install_cpu_backend


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    vpp: int | None
    dp: int
    cp: int = 1                   # context parallel: ranks that share one sample, each a block of its sequence
    host_group: object = None     # gloo group of all ranks where the default one is NCCL (else None): the loop's
                                  # per-step agreements then leave the GPU's queue alone instead of waiting for it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def discover_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) when neither is set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), _env_int("LOCAL_RANK", default=0)
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                _env_int("SLURM_LOCALID", default=0))
    return 0, 1, 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no GPU is visible; use train.device=cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU (this node shows {count}); start at most {count} "
                          f"processes per node (torchrun --nproc-per-node / srun --ntasks-per-node)")
    return torch.device("cuda", local_rank)


def setup(cfg) -> World:
    """Initialise torch.distributed and megatron's parallel_state for `cfg` (a RunConfig). Collective."""
    from megatron.core import parallel_state

    rank, world_size, local_rank = discover_ranks()
    device = choose_device(cfg.train.device, local_rank)
    dp = cfg.data_parallel_size(world_size)  # raises a clear error before any process group exists
    cfg.num_microbatches(world_size)
    init_method = "env://"
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        init_method = f"tcp://127.0.0.1:{_free_port()}"  # a fresh port per run (the demo runs twice in-process)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if init_method == "env://" and name not in os.environ:
            raise ConfigError(f"{name} is not set: with {world_size} processes, launch with torchrun or set "
                              f"MASTER_ADDR/MASTER_PORT (launch/slurm/*.sbatch does this under srun)")

    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        install_cpu_backend()
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                             timeout=timedelta(minutes=10))
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():  # e.g. a test harness set up its own layout
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
    )
    host_group = torch.distributed.new_group(backend="gloo") if backend == "nccl" and world_size > 1 else None
    world = World(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                  tp=p.tp, pp=p.pp, vpp=p.vpp, dp=dp, cp=p.cp, host_group=host_group)
    seed_everything(cfg.train.seed, graph_safe=uses_cuda_graph(cfg, world))
    choose_cublas_workspace(cuda=device.type == "cuda", deterministic=cfg.train.deterministic,
                            hidden_size=cfg.model.hidden_size)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return world


def uses_cuda_graph(cfg, world: World) -> bool:
    """Whether each step's forward+backward is replayed as one CUDA graph: `train.cuda_graph` where it is set;
    where it is null (the default), on for a one-GPU run of the fused path without train.recompute or
    train.deterministic. That is where the CPU's kernel launches bound the step (320m: 1.65x on an H200) and where
    the graph is tested against the eager step; with more GPUs, recompute or deterministic algorithms it is not."""
    t = cfg.train
    if t.cuda_graph is not None:
        return t.cuda_graph and world.on_gpu
    return world.on_gpu and world.world_size == 1 and t.fused and not t.recompute and not t.deterministic


# From this hidden size on, CUDA training runs cuBLAS without a workspace (see choose_cublas_workspace).
NO_WORKSPACE_FROM_HIDDEN = 2048
NO_WORKSPACE = ":0:0"   # CUBLAS_WORKSPACE_CONFIG for none


def choose_cublas_workspace(cuda: bool, deterministic: bool, hidden_size: int) -> None:
    """Set cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG) unless the environment already does; PyTorch reads it at its
    first matmul. Deterministic runs get the 4 MiB x 8 that cuBLAS needs for repeatable GEMMs. CUDA runs of models
    with hidden_size >= NO_WORKSPACE_FROM_HIDDEN get none: with a workspace cuBLAS zeroes part of it before each of
    its Hopper kernels (a memset per matmul, 271 per 1.3b micro-batch, each also a turnaround); without one it picks
    kernels that need none, and the 1.3b step ran 0.7% faster on an H200. Narrower models keep PyTorch's default
    (32 MiB): without it TransXSSM 320m trained 2.4% slower on an H200 and Transformer 320m as fast
    (docs/performance.md; likely the SS mixer's thin products, such as dt_proj's 12 x 768 weight gradient over
    16K tokens, for which cuBLAS splits K only with a workspace)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif cuda and hidden_size >= NO_WORKSPACE_FROM_HIDDEN:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", NO_WORKSPACE)


def describe_cublas_workspace() -> str:
    """The workspace cuBLAS runs with, for the log: choose_cublas_workspace's choice or the environment's."""
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace == NO_WORKSPACE:
        return "cuBLAS without a workspace"
    return f"cuBLAS workspace {workspace}" if workspace else "cuBLAS with PyTorch's default workspace"


def seed_everything(seed: int, graph_safe: bool = False) -> None:
    """Same seed on every rank; megatron's tracker gives TP ranks their own stream for TP-split regions.
    `graph_safe`: the tracker holds torch.Generator objects, which a captured CUDA graph can register and advance
    (train.cuda_graph)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=graph_safe)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
