"""The pretraining loop: one `Trainer`, reading like the algorithm.

    summary = train(cfg)        # cfg: RunConfig; collective over all ranks; returns a dict on every rank

    set up ranks -> build model chunks (TP/PP/VPP) -> DDP -> optimizer + scheduler -> resume -> data
    repeat: micro-batches through megatron's forward_backward_func (grad accumulation to the global batch)
            -> clip + AdamW step, skipped on the device where the loss or gradient norm is NaN/inf
            -> (one step later) skip count, schedule, log -> validate / checkpoint / preemption

The host never waits for the GPU inside a step: the loss, the gradient norm and the skip decision stay on the
device and reach the host one step later (`Trainer.settle`), so the next step's kernels queue up behind the
update instead of the GPU idling while the host reads them back.

Everything parallel is megatron-core's: parallel_state, DistributedDataParallel, get_megatron_optimizer
(distributed optimizer on GPU), OptimizerParamScheduler, the pipeline schedules, finalize_model_grads.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from transxssm_megatron.config import ConfigError
from transxssm_megatron.model.fused_ops import conv_kernels_chosen, set_fusion
from transxssm_megatron.training import data as data_lib
from transxssm_megatron.training import fast_optimizer
from transxssm_megatron.training import metrics as metrics_lib
from transxssm_megatron.training import optim as optim_lib
from transxssm_megatron.training import parallel
from transxssm_megatron.training import wgrad_accumulation
from transxssm_megatron.training.checkpointing import CheckpointManager
from transxssm_megatron.training.preemption import PreemptionHandler
from transxssm_megatron.training.run_config import RunConfig


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------- model
def build_model_chunks(cfg: RunConfig, world: parallel.World, bf16: bool) -> list[torch.nn.Module]:
    """One model chunk per virtual pipeline stage of this rank, on its device, wrapped in megatron DDP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from transxssm_megatron.model.builder import build_model, build_transformer_config

    tconfig = build_transformer_config(
        cfg.model, tp=world.tp, pp=world.pp, vpp=world.vpp, cp=world.cp,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        sequence_parallel=cfg.parallel.sequence_parallel,
        use_cpu_initialization=not world.on_gpu,
        # Batched isend/irecv only without virtual stages and only on NCCL (gloo cannot batch). With VPP a rank
        # sends activations and gradients to the same peer both ways (pp = 2: previous = next), and a batch pairs
        # them by issue order, which differs between the two ranks: activations land in gradient buffers and back.
        # On the H200 PP=2 x VPP=2 trained with gradient norms of 1e6-1e10 and a flat loss; megatron's unbatched
        # path orders the operations by rank parity and pairs them correctly (Megatron-LM also leaves batching off
        # for interleaved schedules).
        batch_p2p_sync=world.on_gpu and not world.vpp,
        batch_p2p_comm=world.on_gpu and not world.vpp,
        gradient_accumulation_fusion=uses_wgrad_fusion(cfg, world) and wgrad_accumulation.install(),
        **(recompute_settings(cfg.train.recompute_layers) if cfg.train.recompute else {}),
    )
    chunks = []
    for vp_stage in range(world.vpp or 1):
        stage = vp_stage if world.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = build_model(cfg.model, tconfig, pre_process=pre, post_process=post, vp_stage=stage)
        model.to(world.device)
        chunks.append(model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=world.on_gpu and cfg.parallel.use_distributed_optimizer,
        **overlapped_communication(cfg, world),
        check_for_nan_in_grad=False,  # we detect NaN/inf ourselves and skip the step instead of crashing
    )
    wrapped = []
    for i, model in enumerate(chunks):
        if bf16:
            model = Float16Module(tconfig, model)
        wrapped.append(DistributedDataParallel(tconfig, ddp_config, model, disable_bucketing=i > 0))
    return wrapped


def overlapped_communication(cfg: RunConfig, world: parallel.World) -> dict:
    """DDP's overlap settings, each on only where it has something to overlap: the gradient reduce(-scatter) of
    each bucket as soon as its gradients are ready, while the backward goes on; the distributed optimizer's
    all-gather of the updated parameters bucket by bucket, in forward hooks as the next forward reaches them,
    instead of all at once after the step. Both over the data-parallel x context-parallel ranks."""
    data_parallel = world.dp * world.cp > 1
    distributed_optimizer = world.on_gpu and cfg.parallel.use_distributed_optimizer
    return dict(overlap_grad_reduce=cfg.parallel.overlap_grad_reduce and data_parallel,
                overlap_param_gather=cfg.parallel.overlap_param_gather and distributed_optimizer and data_parallel)


def recompute_settings(decoder_layers: Optional[int]) -> dict:
    """TransformerConfig's recompute fields: every sub-layer (None), or megatron's "block" method over the first
    `decoder_layers` of each model chunk, counted in HybridStack sub-layers (two per decoder layer)."""
    if decoder_layers is None:
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2 * decoder_layers)


def count_parameters(chunks) -> int:
    """Parameters of the whole model: TP-split tensors summed over TP ranks, replicated ones counted once,
    summed over pipeline stages, the tied output-layer copy of the embedding not counted again."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    local = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if "output_layer" in name and getattr(p, "shared_embedding", False) and not \
                    parallel_state.is_pipeline_first_stage(ignore_virtual=True):
                continue
            if param_is_not_tensor_parallel_duplicate(p):
                local += p.numel()
    total = torch.tensor([local], dtype=torch.float64)
    group = parallel_state.get_model_parallel_group()
    if torch.distributed.get_backend(group) == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total, group=group)
    return int(total.item())


def uses_wgrad_fusion(cfg: RunConfig, world: parallel.World) -> bool:
    """Whether the linear layers add weight gradients into the fp32 buffer inside their matmuls."""
    return world.on_gpu and cfg.train.fused and cfg.train.wgrad_fusion and wgrad_accumulation.supported()


def describe_speed_paths(cfg: RunConfig, world: parallel.World) -> str:
    """One log line: which of the fused paths this run uses, and why not where it does not."""
    if not cfg.train.fused:
        ops = "eager reference path (train.fused=false)"
    elif world.on_gpu:
        ops = "elementwise ops fused by torch.compile, chunked LM head + cross-entropy"
        if uses_wgrad_fusion(cfg, world):
            ops += ", weight gradients accumulated in fp32 by the matmuls"
        width = cfg.model.ss_conv_width
        if cfg.model.ss_conv1d and conv_kernels_chosen(width):
            ops += ", the causal conv1d in its Triton kernels"
        elif cfg.model.ss_conv1d:
            why = "TRANSXSSM_CONV_KERNELS=0" if width == 4 else f"width {width}; the kernels take 4"
            ops += f", the causal conv1d compiled ({why})"
    else:
        ops = "elementwise ops eager on CPU (fusion needs CUDA), chunked LM head + cross-entropy"
    graph = ", forward+backward replayed as a CUDA graph" if parallel.uses_cuda_graph(cfg, world) else ""
    names = {"overlap_grad_reduce": "gradient reduce", "overlap_param_gather": "parameter all-gather"}
    overlap = " and ".join(names[key] for key, on in overlapped_communication(cfg, world).items() if on)
    blas = f", {parallel.describe_cublas_workspace()}" if world.on_gpu else ""
    return f"speed: {ops}{graph}{blas}" + (f", {overlap} overlapped with compute" if overlap else "")


def speed_hint(cfg: RunConfig, world: parallel.World) -> Optional[str]:
    """A log line for a one-GPU run of the fused path whose CUDA graph was left off by train.recompute or
    train.deterministic rather than by the user (None otherwise)."""
    t = cfg.train
    if world.on_gpu and world.world_size == 1 and t.fused and t.cuda_graph is None and \
            not parallel.uses_cuda_graph(cfg, world):
        return ("hint: no CUDA graph with train.recompute or train.deterministic unless asked for; "
                "train.cuda_graph=true replays each step as one graph, for models whose step waits on kernel "
                "launches (320m: 1.65x on one H200; docs/performance.md)")
    return None


def release_cuda_graphs(wrapper) -> None:
    """Drop a FullCudaGraphWrapper's captured graph and its static input buffers (both are class-level in
    megatron-core), so that another Trainer in this process captures afresh."""
    from megatron.core.full_cuda_graph import StaticBufferLoader

    wrapper.reset_cuda_graph()
    for buffers in StaticBufferLoader.static_buffers.values():
        buffers.clear()


# ---------------------------------------------------------------------------------------------- steps
def _loss_func(loss_mask: torch.Tensor, cp_group, loss_sum: torch.Tensor):
    """The model's masked loss sum; megatron divides it by the token count and the micro-batch count.

    With context parallelism each rank holds its block's sum and tokens; the report keeps them (the world
    all-reduce of the report adds the blocks). For the gradient the divisor is the whole micro-batch's token
    count (summed over the CP ranks), and the loss is scaled by cp because DDP averages gradients over the
    data-parallel x context-parallel ranks: the CP ranks' gradients then add up to that of the whole sequence's
    token mean, exactly as at cp = 1, however unevenly loss_mask spreads over the blocks."""
    tokens = loss_mask.sum()
    report = torch.stack([loss_sum.detach().float(), tokens.detach().float()])
    if cp_group is not None and cp_group.size() > 1:
        tokens = tokens.detach().clone()
        torch.distributed.all_reduce(tokens, group=cp_group)
        loss_sum = loss_sum * cp_group.size()
    return loss_sum, tokens.to(torch.int), {"lm loss": report}


def make_forward_step(device: torch.device, cp_group=None):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        # Positions restart only with reset_position_ids, which the data never sets: 0..l-1 for every row (None)
        # lets the model build one shared RoPE table instead of one per row.
        output = model(tokens, None, None, labels=labels, loss_mask=loss_mask)
        return output, partial(_loss_func, loss_mask, cp_group)

    return forward_step


def _sum_reports(reports: list[dict]) -> Optional[torch.Tensor]:
    """[loss_sum, tokens] summed over micro-batches, on the device (only the last pipeline stage has any)."""
    if not reports:
        return None
    return torch.stack([r["lm loss"].float() for r in reports]).sum(0)


def _global_mean_loss(pair: Optional[torch.Tensor], world: parallel.World) -> torch.Tensor:
    """Token-weighted mean loss of the whole global batch, identical on every rank: a scalar on the device.

    Only last-stage ranks hold [loss_sum, tokens]; others add zeros. TP ranks of a stage hold the same pair,
    which scales sum and count alike, and CP ranks each their block's, which add up to the sample's, so one world
    all-reduce gives the exact mean everywhere (and a NaN anywhere reaches every rank, so all take the same skip
    decision)."""
    t = pair.clone() if pair is not None else torch.zeros(2, device=world.device)
    torch.distributed.all_reduce(t)
    return t[0] / t[1].clamp(min=1)


@dataclass
class _LaunchedStep:
    """A step whose update is queued on the device; its [loss, grad_norm, skipped] reach `values` (pinned host
    memory on CUDA) once the device has passed `finished` (its end: an event on CUDA, else the host's clock)."""
    step: int
    consumed_samples: int
    values: torch.Tensor
    finished: metrics_lib.TimeMark


# ---------------------------------------------------------------------------------------------- trainer
def preflight(cfg: RunConfig) -> None:
    """Checks that need no process group: fail in seconds, not after the model is built."""
    if cfg.data.mode == "gpt":
        data_lib.check_data(cfg)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(f"checkpoint.resume: {resume} does not exist; use auto, none or a checkpoint directory "
                          f"such as {cfg.checkpoint_dir}/iter_0000100")
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"logging.run_dir: cannot create {run_dir} ({err.strerror}); choose a writable folder") \
            from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"logging.run_dir: {run_dir} is not writable; choose a writable folder")
    on_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if cfg.train.precision == "bf16" and on_cpu:
        raise ConfigError("train.precision: bf16 training needs a GPU; use fp32 (or auto) on CPU")
    if cfg.train.cuda_graph and on_cpu:
        raise ConfigError("train.cuda_graph: CUDA graphs need a GPU; set train.cuda_graph=false on CPU")


class Trainer:
    """Holds the run's pieces; `run()` trains to `train.steps` (or until preempted / told to exit)."""

    def __init__(self, cfg: RunConfig, print_fn=print):
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        self.cfg = cfg
        preflight(cfg)
        self.world = parallel.setup(cfg)
        w = self.world
        self.is_logger = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                          and parallel_state.get_tensor_model_parallel_rank() == 0
                          and parallel_state.get_data_parallel_rank() == 0
                          and parallel_state.get_context_parallel_rank() == 0)
        self._print = print_fn
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and w.on_gpu)
        self.num_microbatches = cfg.num_microbatches(w.world_size)

        if w.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(cfg.run_dir / "config.yaml")

        set_fusion(cfg.train.fused)
        self.cuda_graph = parallel.uses_cuda_graph(cfg, w)
        if self.cuda_graph:
            # Everything runs on the stream the graph is captured on. Autograd's gradient accumulators are made
            # when DDP registers its hooks and keep the stream current then; on the default (legacy) stream, the
            # captured backward would make that stream wait on the capture and CUDA refuses the capture.
            from megatron.core.full_cuda_graph import get_shared_capture_stream

            torch.cuda.set_stream(get_shared_capture_stream())
        self.print(f"[train] {describe_speed_paths(cfg, w)}")
        hint = speed_hint(cfg, w)
        if hint:
            self.print(f"[train] {hint}")
        self.model = build_model_chunks(cfg, w, self.bf16)
        self.num_params = count_parameters(self.model)
        fast_optimizer.install_multi_tensor_ops()
        self.optimizer = optim_lib.build_optimizer(cfg, self.model, w, self.bf16)
        self.scheduler = optim_lib.build_scheduler(cfg, self.optimizer)

        # megatron's schedules call these: DP grad all-reduce (and tied-embedding sync) after the last
        # micro-batch, and no grad sync during accumulation.
        from megatron.core.distributed import finalize_model_grads

        tconfig = get_model_config(self.model[0])
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.forward_backward = get_forward_backward_func()
        self.train_forward_backward = self.forward_backward
        if self.cuda_graph:
            from megatron.core.full_cuda_graph import FullCudaGraphWrapper

            # Step 1 runs eagerly (compiles, allocates), step 2 is captured, later steps replay the graph.
            self.train_forward_backward = FullCudaGraphWrapper(self.forward_backward, cuda_graph_warmup_steps=1)
        self.forward_step = make_forward_step(
            w.device, parallel_state.get_context_parallel_group() if w.cp > 1 else None)

        self.step = 0
        self.consumed_samples = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self._launched: Optional[_LaunchedStep] = None   # the step whose update the device may still be running
        self._window: list[float] = []                   # losses of the settled steps since the last log record
        self._log_at: Optional[int] = None                # a step logged whatever the interval (the run's last)
        self.history: list[dict] = []     # (step, loss) per logged interval, for the summary
        self.val_history: list[dict] = []
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)
        self.preemption = PreemptionHandler()  # SIGTERM / SIGUSR1 -> checkpoint at the next step, exit cleanly
        self.resumed_from = self._maybe_resume()
        adamw = fast_optimizer.use_fused_adamw(self.optimizer)   # its found_inf lets the device decide a skip
        if adamw:
            self.print(f"[train] AdamW: {adamw}")

        total_samples = cfg.train.steps * cfg.train.global_batch_size
        valid_samples = cfg.train.eval_iters * cfg.train.global_batch_size  # the same set at any TP/PP/DP
        self.datasets = data_lib.build_datasets(cfg, w, total_samples, valid_samples)

        flops_per_token = metrics_lib.train_flops_per_token(cfg.model, cfg.train.seq_length)
        peak = metrics_lib.peak_flops_per_device(w.device, cfg.logging.peak_tflops)
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self.throughput = metrics_lib.Throughput(tokens_per_step, flops_per_token, w.world_size, peak)
        self._restart_throughput()
        log_print = partial(print, flush=True) if print_fn is print else print_fn
        self.metrics = (metrics_lib.MetricsWriter(cfg.run_dir, cfg, self.step, log_print,
                                                  resumed_from=self.resumed_from) if self.is_logger else None)

    # ------------------------------------------------------------------ helpers
    def print(self, *args) -> None:
        """Messages from global rank 0 only (step lines come from the loss-holding rank's MetricsWriter)."""
        if self.world.is_main:
            self._print(*args, flush=True) if self._print is print else self._print(*args)

    def _maybe_resume(self) -> Optional[Path]:
        """Load the checkpoint `checkpoint.resume` asks for: `auto` the newest intact one (each newer damaged or
        unfinished one is skipped with a warning), a PATH exactly that one (a damaged PATH is an error, never a
        silent fallback). Then clean what interrupted saves left in the checkpoint dir."""
        resume, checkpoints = self.cfg.checkpoint.resume, self.checkpoints
        path = state = None
        if resume == "auto":
            path, skipped = checkpoints.newest_intact()
            for status in skipped:
                self.print(f"[train] warning: skipped checkpoint {status.path}: {status.reason}")
            if skipped:
                self.print(f"[train] warning: resuming from the newest intact checkpoint, {path.name}" if path else
                           "[train] warning: no complete checkpoint to resume from; starting from scratch")
            if path is not None:
                state = checkpoints.load(path, self.model, self.optimizer, self.scheduler, verify=False)
        elif resume != "none":
            path = Path(resume)
            if not path.exists():
                raise ConfigError(f"checkpoint.resume: {path} does not exist; use auto, none or a checkpoint "
                                  f"directory (ls {self.cfg.checkpoint_dir})")
            state = checkpoints.load(path, self.model, self.optimizer, self.scheduler)
        for message in checkpoints.clean_stale(intact=path):
            self.print(f"[train] checkpoints: {message}")
        if state is None:
            return None
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_total = int(state.get("skipped_total", 0))
        self.history = list(state.get("history", []))
        self.val_history = list(state.get("val_history", []))
        self.print(f"[train] resumed from {path} at step {self.step} "
                   f"(consumed samples {self.consumed_samples})")
        return path

    def train_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "skipped_total": self.skipped_total,
                "world_size": self.world.world_size,
                "history": self.history, "val_history": self.val_history}

    def save_checkpoint(self, reason: str) -> Path:
        self.settle()   # the schedule, skip count and history must include the last step
        for chunk in self.model:
            if chunk.ddp_config.overlap_param_gather:   # the last update's all-gather waits for the next forward:
                chunk.start_param_sync(force_sync=True)  # do it now, so every saved weight is the updated one
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, self.train_state())
        self.print(f"[train] checkpoint ({reason}) at step {self.step} -> {path} "
                   f"({time.perf_counter() - t0:.1f} s)")
        return path

    def _data_iterators(self, batches_fn):
        n = len(self.model)
        return [batches_fn() for _ in range(n)] if n > 1 else batches_fn()

    # ------------------------------------------------------------------ one step
    def train_step(self, data_iterator, wait: bool = True) -> Optional[dict]:
        """One optimizer step: forward/backward over all micro-batches, then clip + AdamW, skipped on the device
        where the loss or the gradient norm is NaN/inf. The previous step is settled between this one's
        forward/backward and its update (the schedule must advance before the update reads the learning rate),
        by which time its numbers have long been computed. Returns the metrics of the step settled last: with
        wait this one, settled at once; without, the previous one (None if none was waiting), and this one is
        settled by the next train_step or by `settle()`."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        t = self.cfg.train
        reports = self.train_forward_backward(
            forward_step_func=self.forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
            forward_only=False)
        previous = self.settle()
        loss = _global_mean_loss(_sum_reports(reports), self.world)
        grad_norm, skipped = fast_optimizer.update_unless_nonfinite(self.optimizer, loss)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        values = torch.stack([loss.float(), grad_norm, skipped])
        if values.is_cuda:   # to pinned memory: the copy queues behind the update instead of waiting for it
            values = torch.empty(3, pin_memory=True).copy_(values, non_blocking=True)
        finished = metrics_lib.time_mark(self.world.device)
        self._launched = _LaunchedStep(self.step, self.consumed_samples, values, finished)
        return self.settle() if wait else previous

    def settle(self) -> Optional[dict]:
        """The launched step's bookkeeping, if one is waiting: count a skip (TrainingError after
        train.max_consecutive_skips in a row) or advance the schedule, and log at the logging interval. Waits for
        the step's numbers; returns its metrics."""
        launched, self._launched = self._launched, None
        if launched is None:
            return None
        if isinstance(launched.finished, torch.cuda.Event):
            launched.finished.synchronize()
        loss, grad_norm, skipped = launched.values.tolist()
        t, step, bad = self.cfg.train, launched.step, skipped != 0.0
        if bad:
            self.skipped_total += 1
            self.consecutive_skips += 1
            self.print(f"[train] step {step}: non-finite loss ({loss:.4g}) or grad norm ({grad_norm:.4g}); "
                       f"update skipped ({self.consecutive_skips} in a row, {self.skipped_total} total)")
            if self.consecutive_skips >= t.max_consecutive_skips:
                raise TrainingError(
                    f"{self.consecutive_skips} consecutive steps had a NaN/inf loss or gradient norm (last at step "
                    f"{step}); training diverged. Lower optim.lr (now {self.cfg.optim.lr}), check the data, "
                    f"or resume from an earlier checkpoint in {self.cfg.checkpoint_dir}")
        else:
            self.scheduler.step(increment=1)  # the schedule advances with successful updates only
            self.consecutive_skips = 0
            self._window.append(loss)
        if step % self.cfg.logging.interval == 0 or step == self._log_at:
            self._log(step, launched.consumed_samples, grad_norm, launched.finished)
        return {"step": step, "loss": loss, "grad_norm": grad_norm, "skipped": bad}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_iters` global batches of the valid split, the same samples
        at every evaluation and at any layout (NaN if no valid split)."""
        if self.datasets.valid is None or self.cfg.train.eval_iters == 0:
            return float("nan")
        for chunk in self.model:
            chunk.eval()
        t = self.cfg.train
        it = self._data_iterators(lambda: data_lib.valid_batches(self.datasets.valid, self.cfg, self.world))
        reports = self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=it, model=self.model,
            num_microbatches=t.eval_iters * self.num_microbatches, seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=True)
        for chunk in self.model:
            chunk.train()
        return float(_global_mean_loss(_sum_reports(reports), self.world))

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train from the current step to `train.steps` (or exit_after_steps / time limit / preemption)."""
        cfg, w, t = self.cfg, self.world, self.cfg.train
        self.print(f"[train] {cfg.model.architecture} {self.num_params / 1e6:.1f}M params | world {w.world_size} "
                   f"(tp {w.tp}, pp {w.pp}{f', vpp {w.vpp}' if w.vpp else ''}{f', cp {w.cp}' if w.cp > 1 else ''}, "
                   f"dp {w.dp}) on {w.device.type} | "
                   f"{'bf16' if self.bf16 else 'fp32'} | global batch {t.global_batch_size} x {t.seq_length} tokens "
                   f"= {self.num_microbatches} micro-batches of {t.micro_batch_size} per DP rank | "
                   f"steps {self.step} -> {t.steps} | run dir {cfg.run_dir}")
        batches = self._data_iterators(
            lambda: data_lib.train_batches(self.datasets.train, self.consumed_samples, cfg, w))
        stop_at = min(t.steps, t.exit_after_steps) if t.exit_after_steps else t.steps
        deadline = time.monotonic() + 60 * t.time_limit_minutes if t.time_limit_minutes else None
        status, last_saved, last_saved_step = "finished", None, None
        self._log_at = stop_at
        if t.eval_at_start:
            self._validate(self.step)
        self._restart_throughput()
        while self.step < stop_at:
            self.train_step(batches, wait=False)
            step = self.step
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.steps:
                self._validate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < stop_at:
                last_saved, last_saved_step = self.save_checkpoint("interval"), step
                self._restart_throughput()  # keep checkpoint time out of tokens/s
            # one collective for both: ranks' clocks and signals can disagree, the decision must not
            preempted, out_of_time = self.preemption.poll(deadline is not None and time.monotonic() > deadline,
                                                          group=self.world.host_group)
            if out_of_time:
                self.print(f"[train] train.time_limit_minutes={t.time_limit_minutes} reached at step {step}")
                status = "time_limit"
                break
            if preempted:
                self.print(f"[train] preemption signal received: saving at step {step} and exiting")
                status = "preempted"
                break
        self.settle()
        if status == "finished" and self.step < t.steps:
            status = "paused"  # exit_after_steps reached
        if (cfg.checkpoint.save_at_end or status != "finished") and last_saved_step != self.step:
            last_saved = self.save_checkpoint(status)
        if status == "preempted":
            self.preemption.mark_preempted(cfg.run_dir, self.step)
        return {"status": status, "step": self.step, "consumed_samples": self.consumed_samples,
                "skipped_total": self.skipped_total, "history": self.history, "val_history": self.val_history,
                "run_dir": str(cfg.run_dir), "checkpoint": str(last_saved) if last_saved else None,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "num_params": self.num_params}

    def _log(self, step: int, consumed_samples: int, grad_norm: float, finished: metrics_lib.TimeMark) -> None:
        """One metrics record: the mean loss of the settled steps since the last one, and their speed up to the
        end of this step (`finished`)."""
        losses, self._window = self._window, []
        record = {"step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "lr": optim_lib.current_lr(self.optimizer), "grad_norm": grad_norm,
                  "consumed_samples": consumed_samples, "skipped_total": self.skipped_total,
                  **self.throughput.read(finished, step), **metrics_lib.memory_stats(self.world.device)}
        if self.is_logger:
            self.metrics.write(record)
        self.history.append({"step": step, "loss": record["loss"]})

    def _restart_throughput(self) -> None:
        """A new tokens/s window from now, after the last settled step (every caller has settled it)."""
        self.throughput.reset(metrics_lib.time_mark(self.world.device), self.step)

    def _validate(self, step: int) -> None:
        self.settle()   # its log line first
        val = self.evaluate()
        if self.is_logger and math.isfinite(val):
            self.metrics.write({"step": step, "val_loss": val})
        self.val_history.append({"step": step, "val_loss": val})
        self._restart_throughput()  # keep validation time out of tokens/s

    def close(self) -> None:
        """Flush the metric sinks, free a captured graph and give the signal handlers back (the process groups
        stay up)."""
        if self.train_forward_backward is not self.forward_backward:
            release_cuda_graphs(self.train_forward_backward)
            torch.cuda.set_stream(torch.cuda.default_stream())
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.preemption.uninstall()


def train(cfg: RunConfig, print_fn=print) -> dict:
    """Build a Trainer, run it, tear the process groups down. Collective over all ranks."""
    trainer = None
    try:
        trainer = Trainer(cfg, print_fn=print_fn)
        return trainer.run()
    except torch.cuda.OutOfMemoryError:
        t, p = cfg.train, cfg.parallel
        raise TrainingError(
            f"GPU out of memory with micro_batch_size={t.micro_batch_size}, seq_length={t.seq_length}, "
            f"tp={p.tp}, pp={p.pp}. Lower train.micro_batch_size (the global batch stays the same: more gradient "
            f"accumulation), or raise parallel.tp / parallel.pp, or use parallel.use_distributed_optimizer=true "
            f"with more data-parallel ranks") from None
    finally:
        if trainer is not None:
            trainer.close()
        parallel.teardown()
