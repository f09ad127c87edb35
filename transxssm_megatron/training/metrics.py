"""Throughput accounting (FLOPs, MFU) and the metric sinks: console, JSONL, TensorBoard, wandb.

FLOP counting (docs/training.md has the derivation). Per token, forward, one multiply-add = 2 FLOPs,
counting the work a causal kernel has to do (half of the square for attention and the SSD intra-chunk part):

    SS layer   2 d (H P + 2 G N + H [+ H P if z-gate])          in_proj
             + 2 H P d                                           out_proj
             + 2 H (Q/2 (N + P) + 2 N P)                         SSD: C B^T and (C B^T) x inside chunks of Q,
                                                                 chunk states B^T x and state read-out C h
             [+ 2 w (H P + 2 G N) if conv1d]                     depthwise causal conv of width w
    SA layer   2 d (H_q D + 2 H_kv D) + 2 H_q D d                QKV and output projections
             + 2 * 2 * (l / 2) H_q D                             Q K^T and A V over the causal half
    FFN        2 * 3 d I                                         SwiGLU gate, up, down
    LM head    2 d V                                             (padded vocabulary)

Training FLOPs = 3 x forward (backward = 2 x forward; no activation recomputation). MFU = achieved
FLOP/s per device / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import torch

# Dense bf16 peak FLOP/s (no sparsity) by GPU name fragment, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def layer_forward_flops_per_token(model_cfg, seq_length: int) -> dict[str, float]:
    """Forward FLOPs per token of each layer kind: {'ss': ..., 'sa': ..., 'ffn': ..., 'head': ...}."""
    m = model_cfg
    d, h, p = m.hidden_size, m.num_attention_heads, m.head_dim
    n, g, q = m.state_size, m.ss_groups, min(m.ss_chunk_size, seq_length)
    in_proj = h * p + 2 * g * n + h + (h * p if m.ss_z_gate else 0)
    ss = 2 * d * in_proj + 2 * h * p * d + 2 * h * (q / 2 * (n + p) + 2 * n * p)
    if m.ss_conv1d:
        ss += 2 * m.ss_conv_width * (h * p + 2 * g * n)
    kv = m.num_query_groups
    sa = 2 * d * (h * p + 2 * kv * p) + 2 * h * p * d + 2 * 2 * (seq_length / 2) * h * p
    ffn = 2 * 3 * d * m.ffn_hidden_size
    head = 2 * d * m.padded_vocab_size
    return {"ss": ss, "sa": sa, "ffn": ffn, "head": head}


def train_flops_per_token(model_cfg, seq_length: int) -> float:
    """Training FLOPs per token for the whole model (3 x forward)."""
    per = layer_forward_flops_per_token(model_cfg, seq_length)
    kinds = model_cfg.layer_kinds()
    forward = sum(per[k] + per["ffn"] for k in kinds) + per["head"]
    return 3.0 * forward


def peak_flops_per_device(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU; MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


TimeMark = Union[float, torch.cuda.Event]


def time_mark(device: torch.device) -> TimeMark:
    """A point in the run: on CUDA an event queued behind the work launched so far (timed when the device reaches
    it), elsewhere the host's clock (the host then runs the work itself)."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start: TimeMark, end: TimeMark) -> float:
    """Seconds from one mark to a later one; waits for `end` on CUDA."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU of the steps finished between two marks (`time_mark`): the window from
    `reset` or the last `read` to the mark of the step read now, counting the steps between them. On CUDA the marks
    are the events each step's update records, so a window holds exactly its steps' device time (or, where the
    host is slower, its launches) however far the host runs ahead of the device."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak: Optional[float]):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self.start: Optional[TimeMark] = None
        self.start_step = 0

    def reset(self, mark: TimeMark, step: int) -> None:
        """Start a window at `mark`, after step `step` finished (validation, checkpoints stay out of it)."""
        self.start, self.start_step = mark, step

    def read(self, mark: TimeMark, step: int) -> dict[str, float]:
        """The window up to `mark`, the end of step `step`; the next window starts there."""
        steps = step - self.start_step
        elapsed = max(seconds_between(self.start, mark), 1e-9)
        self.reset(mark, step)
        tokens_per_s = steps * self.tokens_per_step / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        out = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "step_time_s": elapsed / max(steps, 1)}
        if self.peak:
            out["mfu"] = tflops * 1e12 / self.peak
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_alloc_gib": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import psutil

        return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


def format_line(record: dict) -> str:
    """One console line: step, loss, lr, grad norm, tokens/s, TFLOP/s, MFU, memory, skips."""
    parts = [f"step {record['step']:>6d}"]
    fmt = [("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.3e}"), ("grad_norm", "gnorm {:.3f}"),
           ("tokens_per_s", "{:,.0f} tok/s"), ("tflops_per_device", "{:.1f} TFLOP/s/dev"), ("mfu", "MFU {:.1%}"),
           ("mem_peak_gib", "mem {:.1f} GiB"), ("mem_rss_gib", "rss {:.2f} GiB"), ("skipped_total", "skipped {}")]
    for key, template in fmt:
        value = record.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)) or (key == "skipped_total" and not value):
            continue
        parts.append(template.format(value))
    return " | ".join(parts)


def _wandb_run_id(run_dir: Path) -> str:
    """One wandb run per run dir: the id is made once and kept in run_dir/wandb_run_id, so a resumed job appends
    to the same wandb run instead of starting a new one."""
    path = run_dir / "wandb_run_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _checkpoint_of(cfg, step: int) -> Path:
    """The checkpoint a run that resumed at `step` loaded: the one checkpoint.resume names, else (auto) the
    newest intact one, which is the folder of that step in the checkpoint dir."""
    resume = cfg.checkpoint.resume
    return Path(resume) if resume not in ("auto", "none") else cfg.checkpoint_dir / f"iter_{step:07d}"


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (training records, validation records), each in step order with one record per step:
    the last one written, since a resumed run logs again the steps after its checkpoint. Resume markers
    (`resumed_at_step`) are left out. A missing file gives two empty lists."""
    path = Path(path)
    train, val = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run can be cut short; the resumed run appends after it
            if "val_loss" in record:
                val[record["step"]] = record
            elif "loss" in record:
                train[record["step"]] = record
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


class MetricsWriter:
    """Writes each record to metrics.jsonl, TensorBoard (if installed and enabled) and wandb (if enabled); a
    resumed run (resume_step > 0) first writes a marker line to metrics.jsonl (see `_write_resume_marker`).

    Only the rank that holds the loss (last pipeline stage, first of its TP/DP group) should create one.
    """

    def __init__(self, run_dir: Path, cfg, resume_step: int = 0, print_fn=print,
                 resumed_from: Optional[Path] = None):
        self.print = print_fn
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if self.jsonl.tell() and not _ends_with_newline(run_dir / "metrics.jsonl"):
            self.jsonl.write("\n")  # a killed run's cut-short last line stays alone on its line
        if resume_step:
            self._write_resume_marker(resume_step, resumed_from or _checkpoint_of(cfg, resume_step))
        self.tb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                self.print("[metrics] tensorboard is not installed; skipping TensorBoard logs "
                           "(pip install tensorboard)")
        self.wandb = None
        if cfg.logging.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), config=cfg.to_dict(),
                                        name=run_dir.name, id=_wandb_run_id(run_dir), resume="allow")
            except ImportError:
                self.print("[metrics] logging.wandb=true but wandb is not installed; skipping")

    def _write_resume_marker(self, step: int, checkpoint: Path) -> None:
        """A resumed run logs again the steps after its checkpoint that the run before it already logged; this
        line, written before the first of them, tells readers that from here on the later record of a step wins
        (`read_metrics` applies that). It carries `step` too, so readers that index every record by step keep
        working, and no `loss`, so readers of losses skip it."""
        marker = {"step": step, "resumed_at_step": step, "checkpoint": str(checkpoint)}
        self.jsonl.write(json.dumps(marker) + "\n")
        self.jsonl.flush()

    def write(self, record: dict, console: bool = True) -> None:
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if console:
            self.print(format_line(record))

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
