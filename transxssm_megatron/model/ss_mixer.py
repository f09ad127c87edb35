"""The state-space (SS) mixer of TransXSSM (docs/model.md §2): in_proj, dt_proj -> [conv1d] -> RoPE(B, C) -> SSD ->
out_proj.

Tensor parallelism splits whole B/C groups (and so whole heads): G % tp == 0. To make every TP shard a
contiguous slice of one TP-independent weight, `in_proj`'s output rows are laid out group by group,

    in_proj rows = [group 0 | group 1 | ... | group G-1],   group g = [z (h_g P) | x (h_g P) | B (N) | C (N)]
    dt_proj rows = [head 0 | head 1 | ... | head H-1]

(z only with the z-gate; h_g = H / G heads per group). Rank r of a column-parallel split then holds groups
r*G/tp .. (r+1)*G/tp - 1 and their heads' dt rows, and checkpoints reshard between TP sizes by plain slicing.
dt has its own projection (the same function as more rows of in_proj) so that in_proj's width stays a multiple of
64: with one dt row per head inside it (321 rows per group at P = 64, N = 128), the 320m model's 3,852-wide
projection ran on cuBLAS's unaligned fallback kernels at a third of the speed of its aligned ones on an H200.
The per-head parameters (A_log, dt_bias, D), the conv1d channels (x|B|C per group) and the gated-norm weight
follow the same group order and are split along dim 0 (`sharded_state_dict` says so to dist_checkpointing).

Context parallelism (cp > 1, docs/training.md) shards the sequence outside the mixer. After the projections, one
all-to-all per tensor (`context_parallel.seq_to_heads`) turns this rank's (l/cp, b, all of its TP shard's groups)
into (l, b, 1/cp of those groups): the groups are contiguous in in_proj's rows and the heads in dt_proj's, so the
split falls on whole B/C groups and their heads (G % (tp * cp) == 0). Everything from the projection split on (the
causal conv1d of the baselines included) then sees the whole sequence, positions 0..l-1, for its own groups, and
uses the matching rows of the per-head parameters; y goes back to sequence shards before out_proj. The per-head
parameters stay whole on every CP rank (they are not CP-sharded: their gradients are summed over the CP ranks with
the data-parallel reduction, as for every other parameter).

Parameters with `no_weight_decay = True` (A_log, dt_bias, D, gate_norm_weight) must be excluded from weight
decay by the optimizer (docs/model.md §7).

Shapes: hidden_states (l, b, d) in, (l, b, d) out (megatron's sequence-first layout; with sequence parallelism
l is the local shard and in_proj/out_proj gather/scatter it; with context parallelism l is this CP rank's block).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from transxssm_kernels.rope_ssd import DEFAULT_LAUNCH, ROPE_SSD_IMPORT_ERROR, rope_ssd, ssd_chunked_reference

from ..config import ModelConfig
from .dt_projection import project_dt
from .fused_ops import fusion_enabled, gate_norm, split_projection
from .context_parallel import cp_group_of, heads_to_seq, seq_to_heads
from .groups import tp_group_of
from .norms import param_device
from .rope import RopeTables

log = logging.getLogger(__name__)

# Mamba-2 initialisation of dt_bias: softplus(dt_bias) ~ log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


def select_ssd(x: torch.Tensor, state_size: int, chunk_size: int):
    """The SSD implementation for x (b, l, H, P), logged once per choice: on CUDA the fused Triton kernels; the plain
    PyTorch reference on CPU, for shapes the kernels do not take (N % 32, P % 16, a power-of-two chunk >= 16), or
    when TRANSXSSM_SSD=reference asks for it. On CUDA without importable kernels it is an error, not a silent
    20x slower run."""
    if not x.is_cuda:
        return _chosen(ssd_chunked_reference, "PyTorch reference (CPU)", logging.INFO)
    if os.environ.get("TRANSXSSM_SSD") == "reference":
        return _chosen(ssd_chunked_reference, "PyTorch reference on the GPU (TRANSXSSM_SSD=reference)",
                       logging.WARNING)
    if rope_ssd is None:
        raise RuntimeError(f"the fused SSD kernels failed to import ({ROPE_SSD_IMPORT_ERROR}); install triton, or set "
                           f"TRANSXSSM_SSD=reference to run the much slower PyTorch reference on the GPU")
    P = x.shape[-1]
    if state_size % 32 or P % 16 or chunk_size < 16 or chunk_size & (chunk_size - 1):
        return _chosen(ssd_chunked_reference, f"PyTorch reference on the GPU: the fused kernels need N % 32 == 0, "
                       f"P % 16 == 0 and a power-of-two chunk >= 16 (N={state_size}, P={P}, chunk {chunk_size})",
                       logging.WARNING)
    return _chosen(rope_ssd, "fused Triton kernels", logging.INFO)


def _chosen(fn, description: str, level: int):
    if description not in _announced:
        _announced.add(description)
        log.log(level, "SSD: %s", description)
    return fn


_announced: set[str] = set()


class SSMixer(MegatronModule):
    """State-space mixer. Built by megatron's `build_module` from a ModuleSpec whose params carry `model_cfg`."""

    def __init__(self, config, model_cfg: ModelConfig, layer_number: int = 1, pg_collection=None, **unused):
        super().__init__(config=config)
        self.model_cfg = m = model_cfg
        self.layer_number = layer_number
        self.tp_group = tp_group_of(pg_collection)
        tp = self.tp_group.size()
        rank = self.tp_group.rank()
        self.cp_group = cp_group_of(pg_collection)
        self.cp = self.cp_group.size() if self.cp_group is not None else 1
        self.cp_rank = self.cp_group.rank() if self.cp > 1 else 0

        self.H, self.P, self.N, self.G = m.num_attention_heads, m.head_dim, m.state_size, m.ss_groups
        self.heads_per_group = self.H // self.G
        self.groups_local = self.G // (tp * self.cp)                     # groups and heads the scan sees
        self.heads_local = self.H // (tp * self.cp)
        self.x_width = self.heads_per_group * self.P                      # x (and z) channels per group
        self.z_width = self.x_width if m.ss_z_gate else 0
        self.conv_width = self.x_width + 2 * self.N                       # x|B|C channels per group
        self.group_width = self.z_width + self.conv_width
        self.use_rope = m.ss_positional == "rope"

        self.in_proj = tensor_parallel.ColumnParallelLinear(
            m.hidden_size, self.G * self.group_width, config=config, init_method=config.init_method,
            bias=False, gather_output=False, tp_group=self.tp_group)
        self.dt_proj = tensor_parallel.ColumnParallelLinear(
            m.hidden_size, self.H, config=config, init_method=config.init_method, bias=False, gather_output=False,
            tp_group=self.tp_group)
        self.out_proj = tensor_parallel.RowParallelLinear(
            self.H * self.P, m.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

        # Own parameters: draw the full (TP-independent) tensor from the default generator, keep this rank's
        # rows. Every TP size then starts from the same model, and the RNG stream does not depend on tp.
        def local(full: torch.Tensor, no_weight_decay: bool) -> torch.nn.Parameter:
            rows = full.shape[0] // tp
            shard = full[rank * rows:(rank + 1) * rows].to(dtype=config.params_dtype, device=param_device(config))
            p = torch.nn.Parameter(shard.clone())
            tensor_parallel.set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
            if no_weight_decay:
                p.no_weight_decay = True
            return p

        lo, hi = A_INIT_RANGE
        self.A_log = local(torch.log(torch.empty(self.H).uniform_(lo, hi)), no_weight_decay=True)
        self.dt_bias = None
        if m.ss_dt_bias:
            dt = torch.exp(torch.rand(self.H) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
            dt = dt.clamp(min=DT_FLOOR)
            self.dt_bias = local(dt + torch.log(-torch.expm1(-dt)), no_weight_decay=True)  # softplus^-1(dt)
        self.D = local(torch.ones(self.H), no_weight_decay=True) if m.ss_d_skip else None
        self.conv1d_weight = self.conv1d_bias = None
        if m.ss_conv1d:
            bound = 1.0 / math.sqrt(m.ss_conv_width)  # torch.nn.Conv1d's default for a depthwise conv
            channels = self.G * self.conv_width
            self.conv1d_weight = local(torch.empty(channels, 1, m.ss_conv_width).uniform_(-bound, bound), False)
            self.conv1d_bias = local(torch.empty(channels).uniform_(-bound, bound), no_weight_decay=True)
        self.gate_norm_weight = local(torch.ones(self.H * self.P), no_weight_decay=True) if m.ss_z_gate else None

    def _cp_rows(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """This CP rank's rows of a per-head / per-group parameter (its TP shard, split once more by CP)."""
        if p is None or self.cp == 1:
            return p
        rows = p.shape[0] // self.cp
        return p[self.cp_rank * rows:(self.cp_rank + 1) * rows]

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        if self.tp_group.size() == 1 and self.cp == 1 and fusion_enabled():
            # dt_proj's input gradient added into in_proj's in place (dt_projection.py), its weight gradient
            # into main_grad as megatron's linears do
            x_in, dt = project_dt(hidden_states, self.dt_proj.weight, self.config.gradient_accumulation_fusion)
            proj, _ = self.in_proj(x_in)                                            # (l, b, G * width)
        else:
            proj, _ = self.in_proj(hidden_states)                                   # (l, b, G_tp * width)
            dt, _ = self.dt_proj(hidden_states)                                     # (l, b, H_tp)
        # CP: sequence blocks of all groups -> the whole sequence of this rank's groups (no-ops at cp = 1)
        proj, dt = seq_to_heads(proj, self.cp_group), seq_to_heads(dt, self.cp_group)  # G_loc, H_loc = 1/cp
        l, b = proj.shape[:2]
        widths = (self.z_width, self.x_width, self.N, self.N)
        z, x, B, C = split_projection(proj, self.groups_local, widths, self._cp_rows(self.conv1d_weight),
                                      self._cp_rows(self.conv1d_bias))
        # (l, b, H_loc, P): a view of proj when G = H or G = 1, a copy when a group holds some of several heads
        x = x.reshape(l, b, self.heads_local, self.P)                               # B, C: (l, b, G_loc, N)

        ssd = select_ssd(x, self.N, self.model_cfg.ss_chunk_size)
        cos = sin = None
        if self.use_rope:
            if rope is None or rope.state is None:
                raise ValueError("SSMixer with ss_positional='rope' needs the model's RopeTables (rope.state)")
            # in the dtype the kernels read them in (bf16 with bf16 x): cast once per forward, not in every layer
            cos, sin = rope.state_in(DEFAULT_LAUNCH.table_dtype(x.dtype) if ssd is rope_ssd else torch.float32)
        # The SSD takes (b, l, ...) tensors of any strides and returns y in x's memory layout: sequence-first
        # views in, a sequence-first y out, no copies on the way. Without the conv (whose backward may keep its
        # output) B and C are views of this layer's projection that nothing else reads, so the kernels may rotate
        # them in place for their backward.
        bl = lambda t: t.transpose(0, 1)
        in_place = {"rotate_bc_in_place": True} if ssd is rope_ssd and self.conv1d_weight is None else {}
        # A = -exp(A_log) is formed by the SSD itself (a_is_log), which returns A_log's gradient
        y = bl(ssd(bl(x), bl(dt), self._cp_rows(self.A_log), bl(B), bl(C), a_is_log=True,  # (l, b, H_loc, P)
                   chunk_size=self.model_cfg.ss_chunk_size, dt_bias=self._cp_rows(self.dt_bias), dt_softplus=True,
                   rope_cos=cos, rope_sin=sin, **in_place))
        D = self._cp_rows(self.D)
        if self.gate_norm_weight is not None:  # y = RMSNorm((y + D x) * silu(z)), normalised per B/C group
            y = gate_norm(y, x, D, z.reshape(x.shape), self._cp_rows(self.gate_norm_weight), self.model_cfg.norm_eps,
                          self.x_width)
        else:
            if D is not None:
                y = y + (D.float()[:, None] * x.float()).to(y.dtype)
            y = y.reshape(l, b, self.heads_local * self.P)
        y = heads_to_seq(y, self.cp_group)                                          # CP: back to sequence blocks
        out, _ = self.out_proj(y)                                                   # (l, b, d)
        return out

    # ------------------------------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Own parameters are TP-split along dim 0; in_proj/out_proj describe themselves."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        result = make_sharded_tensors_for_checkpoint(
            own, prefix, {name: 0 for name in own}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            result.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=self.tp_group))
        return result
