"""TransXSSM for Hugging Face transformers (trust_remote_code file): `TransXSSMForCausalLM` and its hybrid cache.

Self-contained: imports only torch and transformers (plus, optionally, `transxssm_kernels` for the fused Triton SSD
on CUDA). The numbers are those of the megatron model (transxssm_megatron/model/), op for op:

    h = w_mix * h + Mixer(RMSNorm(h));  h = w_ffn * h + SwiGLU(RMSNorm(h))     (w = 1 without residual_weights)
    Mixer = SS (state space: in_proj -> [conv1d] -> RoPE(B, C) -> chunked SSD -> [D, z-gate + gated RMSNorm] ->
            out_proj) or SA (causal attention, RoPE on Q/K, optional GQA); final RMSNorm; LM head tied to the
            embedding.

The SS layers of all four architectures (transxssm, mamba2, jamba; `transformer` has none) run through this code:
in_proj rows per B/C group are [z | x | B | C] (z with the z-gate), dt_proj has one row per head, conv1d is a causal
depthwise conv (+ SiLU) over the x|B|C channels. `ssd_chunked` below is the exact chunked SSD of
transxssm_kernels/rope_ssd/reference.py (same operations in the same order), `ssd_step` the recurrent step of
decode.py. On CUDA with `transxssm_kernels` importable the prefill runs its fused Triton kernel instead; a log line
says once which SSD path runs.

Generation: `TransXSSMCache` holds, per layer, the KV tensors of attention layers (RoPE already applied, at each
token's absolute position) and, for SS layers, the SSM state (b, H, P, N) in fp32 and the last conv_width - 1 conv
inputs. A decode step then costs O(1) per SS layer. Left padding is exact: padded tokens get delta = 0 (they
neither decay nor feed the state), zero conv inputs and masked attention keys; positions count real tokens only.
`TransXSSMStaticCache` holds the same state in fixed-shape buffers (K/V of max_length positions, written in place at
a position kept in a device tensor), so that one decode step can be captured as a CUDA graph and replayed
(transxssm_megatron/hf/generate.py, `DecodeGraph`); it takes unpadded batches only.
Supported transformers: 4.57 - 5.x (checked on 4.57.1, 5.17.0, 5.24.0; the cache argument was renamed from
`past_key_values` to `cache` in 5.2x and both names are accepted).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_transxssm import TransXSSMConfig

try:  # the fused CUDA path; absent (or without Triton) everywhere else
    from transxssm_kernels.rope_ssd import rope_ssd as _fused_rope_ssd
except Exception:  # noqa: BLE001 - any import failure means: no fused kernel
    _fused_rope_ssd = None

logger = logging.get_logger(__name__)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"
_announced: set[str] = set()


def _announce(path: str, message: str, warn: bool = False) -> None:
    if path not in _announced:
        _announced.add(path)
        (logger.warning if warn else logger.info)(message)


# ------------------------------------------------------------------------------------------------------- RoPE
def rope_table(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions * base^(-2i/dim), i < dim/2; float64 angles, fp32 tables. positions (...) -> (..., dim/2)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cos(angles).float(), torch.sin(angles).float()


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dim (GPT-NeoX pairing)."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope_state(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate B or C (b, l, G, N) by half tables (l, N/2) or (b, l, N/2); out in promote(t, cos) dtype."""
    dtype = torch.promote_types(t.dtype, cos.dtype)
    cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(-2)
    sin = torch.cat((sin, sin), dim=-1).to(dtype).unsqueeze(-2)
    t = t.to(dtype)
    return t * cos + rotate_half(t) * sin


def rotate_qk(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on Q or K (b, l, heads, D) with tables (l, D/2) or (b, l, D/2): fp32 math, t's dtype out."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    t1, t2 = t.float().chunk(2, dim=-1)
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(t.dtype)


# -------------------------------------------------------------------------------------------------------- SSD
def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal. a (..., T) -> (..., T, T)."""
    T = a.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    out = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def _pad_and_chunk(t: torch.Tensor, pad: int, Q: int) -> torch.Tensor:
    if pad:
        t = torch.cat((t, t.new_zeros((t.shape[0], pad, *t.shape[2:]))), dim=1)
    return t.reshape(t.shape[0], -1, Q, *t.shape[2:])


def ssd_chunked(x, delta, A, B, C, *, chunk_size=256, rope_cos=None, rope_sin=None, initial_state=None):
    """Chunked SSD with Unified RoPE (transxssm_kernels/rope_ssd/reference.py without packed documents).

    x (b, l, H, P); delta (b, l, H) = softplus(dt [+ dt_bias]) in the state dtype (0 for padding tokens);
    A (H,) negative; B, C (b, l, G, N); rope tables None or (l, N/2) / (b, l, N/2); initial_state (b, H, P, N).
    Returns y (b, l, H, P) in x's dtype and the final state (b, H, P, N) (fp32; float64 for float64 x)."""
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C = B.to(dtype), C.to(dtype)
    if rope_cos is not None:
        cos, sin = rope_cos.to(dtype), rope_sin.to(dtype)
        B, C = apply_rope_state(B, cos, sin), apply_rope_state(C, cos, sin)
    R = H // G
    xs = x.to(dtype)
    Q = min(chunk_size, l)
    pad = (-l) % Q
    xdt = _pad_and_chunk(xs * delta[..., None], pad, Q)                   # (b, c, Q, H, P)
    a = _pad_and_chunk(delta * A.to(dtype), pad, Q)                        # (b, c, Q, H)
    Bc, Cc = _pad_and_chunk(B, pad, Q), _pad_and_chunk(C, pad, Q)          # (b, c, Q, G, N)
    n_chunks = xdt.shape[1]
    a = a.permute(0, 3, 1, 2)                                              # (b, H, c, Q)
    a_cum = a.cumsum(dim=-1)

    decay_in_chunk = torch.exp(segment_sum(a))                                            # (b, H, c, Q, Q)
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc).repeat_interleave(R, dim=2)       # (b, c, H, Q, Q)
    y = torch.einsum("bchts,bcshp->bcthp", scores * decay_in_chunk.transpose(1, 2), xdt)  # (b, c, Q, H, P)

    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                                     # (b, H, c, Q)
    Bh = Bc.repeat_interleave(R, dim=3)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bh, decay_to_end, xdt)        # (b, c, H, P, N)

    if initial_state is None:
        initial_state = xs.new_zeros((b, H, P, N))
    sources = torch.cat((initial_state.to(dtype)[:, None], chunk_states), dim=1)        # (b, c+1, H, P, N)
    chunk_decay = F.pad(a_cum[..., -1], (1, 0))                                           # (b, H, c+1)
    decay_between = torch.exp(segment_sum(chunk_decay))                                   # (b, H, c+1, c+1)
    boundary_states = torch.einsum("bhkj,bjhpn->bkhpn", decay_between, sources)
    states_in, final_state = boundary_states[:, :-1], boundary_states[:, -1]

    decay_from_start = torch.exp(a_cum)                                                   # (b, H, c, Q)
    Ch = Cc.repeat_interleave(R, dim=3)
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", Ch, states_in, decay_from_start)
    y = y.reshape(b, n_chunks * Q, H, P)[:, :l]
    return y.to(x.dtype), final_state


def ssd_step(state, x, delta, A, B, C, rope_cos=None, rope_sin=None):
    """One token of the recurrence (transxssm_kernels/rope_ssd/decode.py): state (b, H, P, N) updated in place,
    x (b, H, P), delta (b, H), B, C (b, G, N), tables (b, N/2) or None. Returns y (b, H, P) in x's dtype."""
    dtype = state.dtype
    b, H, _ = x.shape
    B, C = B.to(dtype), C.to(dtype)
    if rope_cos is not None:
        cos, sin = rope_cos.to(dtype)[:, None], rope_sin.to(dtype)[:, None]
        B = apply_rope_state(B[:, None], cos, sin)[:, 0]
        C = apply_rope_state(C[:, None], cos, sin)[:, 0]
    R = H // B.shape[1]
    B, C = B.repeat_interleave(R, dim=1), C.repeat_interleave(R, dim=1)
    xs = x.to(dtype)
    decay = torch.exp(delta * A.to(dtype))
    state.mul_(decay[:, :, None, None]).add_((delta[:, :, None] * xs)[..., None] * B[:, :, None, :])
    return torch.einsum("bhpn,bhn->bhp", state, C).to(x.dtype)


def _fused_fits(x: torch.Tensor, N: int, chunk: int) -> bool:
    return (x.is_cuda and _fused_rope_ssd is not None and N % 32 == 0 and x.shape[-1] % 16 == 0 and chunk >= 16
            and chunk & (chunk - 1) == 0)


# ----------------------------------------------------------------------------------------------------- cache
class TransXSSMCache(Cache):
    """Per-layer generation state: KV for attention layers, SSM state (+ conv inputs) for SS layers.

    key_cache[i], value_cache[i]: (b, kv_heads, t, D) with RoPE applied; ssm_states[i]: (b, H, P, N) fp32;
    conv_states[i]: (b, conv_width - 1, G * (x + 2N)) the last conv inputs. `seen_tokens` counts the positions
    processed so far (padding included). Tensors are allocated on the first forward."""

    is_compileable = False

    def __init__(self, config: TransXSSMConfig):
        # Cache.__init__ is not called: its signature changed across transformers versions and none of its
        # per-layer machinery applies to recurrent state.
        self._empty_stores(config)
        self.seen_tokens = 0

    def _empty_stores(self, config: TransXSSMConfig) -> None:
        n = config.num_hidden_layers
        self.mixer_types = list(config.mixer_types)
        self.key_cache: list = [None] * n
        self.value_cache: list = [None] * n
        self.ssm_states: list = [None] * n
        self.conv_states: list = [None] * n
        self.layers = []

    def __repr__(self) -> str:
        return f"TransXSSMCache(layers={len(self.mixer_types)}, seen_tokens={self.seen_tokens})"

    def __len__(self) -> int:
        return len(self.mixer_types)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self):
        return None

    def get_max_cache_shape(self, layer_idx: int = 0):
        return -1

    def _apply(self, fn) -> None:
        for store in (self.key_cache, self.value_cache, self.ssm_states, self.conv_states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = fn(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        for store in (self.key_cache, self.value_cache, self.ssm_states, self.conv_states):
            store[:] = [None] * len(store)
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("TransXSSMCache cannot be cropped: SS layers keep a recurrent state, not tokens")

    def keep_conv_inputs(self, layer_idx: int, inputs: torch.Tensor) -> None:
        self.conv_states[layer_idx] = inputs.clone()   # a view would keep the whole conv input alive

    def keep_ssm_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.ssm_states[layer_idx] = state

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (b, kv_heads, l, D). Returns the keys and values to attend to (b, kv_heads, past + l, D)
        and `past`, the position of the first new token."""
        l = k.shape[2]
        if self.key_cache[layer_idx] is not None:
            k = torch.cat((self.key_cache[layer_idx], k), dim=2)
            v = torch.cat((self.value_cache[layer_idx], v), dim=2)
        self.key_cache[layer_idx], self.value_cache[layer_idx] = k, v
        return k, v, k.shape[2] - l


class TransXSSMStaticCache(TransXSSMCache):
    """TransXSSMCache in fixed-shape buffers, for decode steps captured once as a CUDA graph and replayed.

    key_cache[i], value_cache[i]: (b, kv_heads, max_length, D), a token's K/V written in place at its position;
    ssm_states[i], conv_states[i]: as in TransXSSMCache, overwritten in place; `position`: 0-d int64 tensor on the
    model's device, the tokens seen so far. A single-token forward reads no host-side counter, allocates no cache
    tensor and moves none, so a captured step replays at the right position: its key is written with index_copy_
    at `position` and attention runs over all max_length slots with the slots after `position` masked.

    The buffers are allocated by the first forward (its batch size, device and dtype) or at construction when
    batch_size is given; `reset()` zeroes them in place for the next prompt. Unpadded batches only: left padding
    needs per-row positions, which TransXSSMCache keeps. A single-token step does not check max_length (that would
    read `position` on the host); the caller counts steps (`DecodeGraph` does)."""

    def __init__(self, config: TransXSSMConfig, max_length: int, batch_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if max_length < 1:
            raise ValueError(f"TransXSSMStaticCache: max_length {max_length}: give the prompt length plus the "
                             "tokens to generate")
        self._empty_stores(config)   # no seen_tokens attribute: here it is read from `position`
        self.config = config
        self.max_length = max_length
        self.position: torch.Tensor | None = None
        self._batch_size: int | None = None
        if batch_size is not None:
            self.allocate(batch_size, device or "cpu", dtype or torch.get_default_dtype())

    def __repr__(self) -> str:
        return (f"TransXSSMStaticCache(layers={len(self.mixer_types)}, max_length={self.max_length}, "
                f"batch_size={self.batch_size})")

    def allocate(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Zeroed buffers (zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN is NaN).
        A no-op once allocated for this batch size."""
        if self.position is not None:
            if batch_size != self._batch_size:
                raise ValueError(f"TransXSSMStaticCache holds batch size {self._batch_size}, the input has "
                                 f"{batch_size}; make a new cache for another batch size")
            return
        c = self.config
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        H, P, N, G = c.num_attention_heads, c.head_dim, c.state_size, c.ss_groups
        conv_channels = G * ((H // G) * P + 2 * N)
        for i, kind in enumerate(self.mixer_types):
            if kind == "sa":
                shape = (batch_size, c.num_key_value_heads, self.max_length, c.head_dim)
                self.key_cache[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.value_cache[i] = torch.zeros(shape, dtype=dtype, device=device)
            else:
                self.ssm_states[i] = torch.zeros((batch_size, H, P, N), dtype=state_dtype, device=device)
                if c.ss_conv1d:
                    self.conv_states[i] = torch.zeros((batch_size, c.ss_conv_width - 1, conv_channels), dtype=dtype,
                                                      device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._batch_size = batch_size

    @property
    def batch_size(self) -> int:
        """The batch size of the buffers; -1 before they are allocated (transformers' Cache convention)."""
        return -1 if self._batch_size is None else self._batch_size

    @property
    def seen_tokens(self) -> int:
        """Tokens seen so far (reads the device position: not for use inside a captured step)."""
        return 0 if self.position is None else int(self.position)

    def get_max_length(self):
        return self.max_length

    def get_max_cache_shape(self, layer_idx: int = 0):
        return self.max_length

    def reset(self) -> None:
        for store in (self.key_cache, self.value_cache, self.ssm_states, self.conv_states):
            for t in store:
                if t is not None:
                    t.zero_()
        if self.position is not None:
            self.position.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.key_cache, self.value_cache, self.ssm_states, self.conv_states):
            for t in store:
                if t is not None:
                    t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("TransXSSMStaticCache has a fixed batch size; use TransXSSMCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("TransXSSMStaticCache has a fixed batch size; use TransXSSMCache")

    def keep_conv_inputs(self, layer_idx: int, inputs: torch.Tensor) -> None:
        self.conv_states[layer_idx].copy_(inputs)

    def keep_ssm_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.ssm_states[layer_idx].copy_(state)

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b, kv_heads, l, D) at the current position. A single token goes in with index_copy_ at the
        device position and all max_length slots are returned, `past` being the position tensor (the caller masks
        the slots after it); a longer input (a prefill) reads the position once and gets the slots up to its end."""
        keys, values = self.key_cache[layer_idx], self.value_cache[layer_idx]
        l = k.shape[2]
        if l == 1:
            index = self.position.view(1)
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
            return keys, values, self.position
        past = int(self.position)
        keys[:, :, past:past + l].copy_(k)
        values[:, :, past:past + l].copy_(v)
        return keys[:, :, :past + l], values[:, :, :past + l], past


# ---------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, fp32 math, x's dtype out."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, config: TransXSSMConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(u).float()) * self.up_proj(u).float()
        return self.down_proj(h.to(u.dtype))


class SSMixer(nn.Module):
    """State-space mixer (SPEC.md §2); parameters named as in the megatron SSMixer."""

    def __init__(self, config: TransXSSMConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.H, self.P, self.N, self.G = c.num_attention_heads, c.head_dim, c.state_size, c.ss_groups
        self.x_width = (self.H // self.G) * self.P
        self.z_width = self.x_width if c.ss_z_gate else 0
        self.conv_width = self.x_width + 2 * self.N
        self.chunk_size = c.ss_chunk_size
        self.eps = c.rms_norm_eps
        self.use_rope = c.ss_positional == "rope"
        self.in_proj = nn.Linear(c.hidden_size, self.G * (self.z_width + self.conv_width), bias=False)
        self.dt_proj = nn.Linear(c.hidden_size, self.H, bias=False)
        self.out_proj = nn.Linear(self.H * self.P, c.hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.H).uniform_(1.0, 16.0)))
        self.dt_bias = nn.Parameter(torch.zeros(self.H)) if c.ss_dt_bias else None
        self.D = nn.Parameter(torch.ones(self.H)) if c.ss_d_skip else None
        self.conv1d = None
        if c.ss_conv1d:
            channels = self.G * self.conv_width
            self.conv1d = nn.Conv1d(channels, channels, c.ss_conv_width, groups=channels, bias=True)
        self.norm = RMSNorm(self.H * self.P, c.rms_norm_eps) if c.ss_z_gate else None

    def _conv(self, xbc: torch.Tensor, cache: TransXSSMCache | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU along l of xbc (b, l, C), continuing from the cached inputs."""
        b, l, channels = xbc.shape
        width = self.conv1d.weight.shape[-1]
        prefix = None if cache is None else cache.conv_states[self.layer_idx]
        if prefix is None:
            prefix = xbc.new_zeros((b, width - 1, channels))
        full = torch.cat((prefix.to(xbc.dtype), xbc), dim=1)           # (b, l + w - 1, C)
        if cache is not None:
            cache.keep_conv_inputs(self.layer_idx, full[:, l:])
        x = full.float()
        w = self.conv1d.weight.float()[:, 0, :]                         # (C, w)
        acc = self.conv1d.bias.float() + sum(x[:, k:k + l] * w[:, k] for k in range(width))
        return F.silu(acc).to(xbc.dtype)

    def forward(self, u, rope, token_mask, cache: TransXSSMCache | None):
        """u (b, l, d); rope (cos, sin) for the state dim or None; token_mask (b, l) (1 real, 0 padding) or None."""
        b, l, _ = u.shape
        proj = self.in_proj(u)
        dt = self.dt_proj(u)                                            # (b, l, H)
        z, xbc = proj.view(b, l, self.G, -1).split([self.z_width, self.conv_width], dim=-1)
        if self.conv1d is not None:
            xbc = xbc.reshape(b, l, -1)
            if token_mask is not None:  # padding enters the conv as the zeros before a sequence's start
                xbc = xbc * token_mask[..., None].to(xbc.dtype)
            xbc = self._conv(xbc, cache).view(b, l, self.G, -1)
        x, B, C = xbc.split([self.x_width, self.N, self.N], dim=-1)
        x = x.reshape(b, l, self.H, self.P)
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        delta = dt.to(state_dtype)
        if self.dt_bias is not None:
            delta = delta + self.dt_bias.to(state_dtype)
        delta = F.softplus(delta)
        if token_mask is not None:  # delta = 0: a padding token neither decays nor feeds the state
            delta = delta * token_mask.to(state_dtype)[..., None]
        A = -torch.exp(self.A_log.float())
        cos, sin = rope if self.use_rope else (None, None)

        state = None if cache is None else cache.ssm_states[self.layer_idx]
        if state is not None and l == 1:
            step = lambda t: None if t is None else (t[:, 0] if t.dim() == 3 else t[0].expand(b, -1))
            y = ssd_step(state, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], step(cos), step(sin))[:, None]
        elif _fused_fits(x, self.N, self.chunk_size):
            _announce("fused", "TransXSSM SS layers: fused Triton SSD (transxssm_kernels.rope_ssd) on CUDA")
            y, final = _fused_rope_ssd(x, delta, A, B, C, chunk_size=self.chunk_size, rope_cos=cos, rope_sin=sin,
                                       initial_state=state, return_final_state=True)
            if cache is not None:
                cache.keep_ssm_state(self.layer_idx, final.float())
        else:
            reason = ("transxssm_kernels is not importable" if _fused_rope_ssd is None else
                      "the shapes do not suit the fused kernel") if x.is_cuda else f"running on {x.device.type}"
            _announce("reference", f"TransXSSM SS layers: pure PyTorch chunked SSD ({reason})", warn=x.is_cuda)
            y, final = ssd_chunked(x, delta, A, B, C, chunk_size=self.chunk_size, rope_cos=cos, rope_sin=sin,
                                   initial_state=state)
            if cache is not None:
                cache.keep_ssm_state(self.layer_idx, final)

        if self.norm is not None:  # RMSNorm((y + D x) * silu(z)) per B/C group
            out = y.float()
            if self.D is not None:
                out = out + self.D.float()[:, None] * x.float()
            out = out * F.silu(z.reshape(b, l, self.H, self.P).float())
            grouped = out.reshape(b, l, -1, self.x_width)
            grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + self.eps)
            y = (grouped.reshape(b, l, -1) * self.norm.weight.float()).to(y.dtype)
        else:
            if self.D is not None:
                y = y + (self.D.float()[:, None] * x.float()).to(y.dtype)
            y = y.reshape(b, l, self.H * self.P)
        return self.out_proj(y)


class Attention(nn.Module):
    """Causal self-attention with RoPE on Q/K (SPEC.md §3); Llama's projection names."""

    def __init__(self, config: TransXSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, u, rope, key_mask, cache: TransXSSMCache | None):
        """u (b, l, d); rope (cos, sin) for the head dim; key_mask (b, past + l) bool (True: real token) or None."""
        b, l, _ = u.shape
        cos, sin = rope
        q = rotate_qk(self.q_proj(u).view(b, l, self.heads, self.head_dim), cos, sin).transpose(1, 2)
        k = rotate_qk(self.k_proj(u).view(b, l, self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(u).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        # past: an int, or (static cache, one token) the device position, with keys in all max_length slots
        k, v, past = (k, v, 0) if cache is None else cache.update_kv(self.layer_idx, k, v)
        total = k.shape[2]
        rep = self.heads // self.kv_heads
        query_pos = (torch.arange(l, device=u.device) + past)[:, None]
        allowed = torch.arange(total, device=u.device)[None, :] <= query_pos            # (l, total) causal
        if key_mask is not None:  # padding keys are hidden; a padding query still sees itself (no empty rows)
            allowed = allowed & (key_mask[:, None, None, :] | (torch.arange(total, device=u.device) == query_pos))
        if q.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=rep > 1)
        else:  # the megatron CPU reference: fp32 scores, explicit softmax
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            out = (probs @ v.float()).to(q.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    """mixer + SwiGLU, both pre-norm with a learnable skip weight (SPEC.md §4)."""

    def __init__(self, config: TransXSSMConfig, layer_idx: int):
        super().__init__()
        self.kind = config.mixer_types[layer_idx]
        d, eps = config.hidden_size, config.rms_norm_eps
        self.mixer_norm = RMSNorm(d, eps)
        self.mixer = SSMixer(config, layer_idx) if self.kind == "ss" else Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(config)
        self.mixer_skip = nn.Parameter(torch.ones(d)) if config.residual_weights else None
        self.mlp_skip = nn.Parameter(torch.ones(d)) if config.residual_weights else None

    def forward(self, h, rope_attention, rope_state, token_mask, key_mask, cache):
        if self.kind == "ss":
            update = self.mixer(self.mixer_norm(h), rope_state, token_mask, cache)
        else:
            update = self.mixer(self.mixer_norm(h), rope_attention, key_mask, cache)
        h = (h if self.mixer_skip is None else h * self.mixer_skip) + update
        update = self.mlp(self.mlp_norm(h))
        return (h if self.mlp_skip is None else h * self.mlp_skip) + update


# ----------------------------------------------------------------------------------------------------- models
class TransXSSMPreTrainedModel(PreTrainedModel):
    config_class = TransXSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _is_stateful = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """SPEC §4 init: N(0, initializer_range) for projections and the embedding, ones for norms and skip
        weights, A_log = log U[1, 16], Mamba-2's dt_bias (softplus(dt_bias) log-uniform in [1e-3, 0.1])."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DecoderLayer):
            for skip in (module.mixer_skip, module.mlp_skip):
                if skip is not None:
                    skip.fill_(1.0)
        elif isinstance(module, SSMixer):
            module.A_log.copy_(torch.log(torch.empty_like(module.A_log).uniform_(1.0, 16.0)))
            if module.D is not None:
                module.D.fill_(1.0)
            if module.dt_bias is not None:
                lo, hi = math.log(1e-3), math.log(1e-1)
                dt = torch.exp(torch.rand_like(module.dt_bias) * (hi - lo) + lo).clamp(min=1e-4)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class TransXSSMModel(TransXSSMPreTrainedModel):
    def __init__(self, config: TransXSSMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                output_hidden_states=False):
        """Returns (last hidden state after the final norm, tuple of hidden states or None)."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, l = h.shape[:2]
        static = isinstance(cache, TransXSSMStaticCache)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the exact unmasked path
        if static:
            past = self._static_past(cache, h, l, attention_mask, position_ids)
        else:
            past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.to(h.device).bool()
            if attention_mask.shape[-1] != past + l:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; expected cached "
                                 f"{past} + new {l}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:  # past: an int, or (static cache, one token) the device position tensor
                position_ids = torch.arange(l, device=h.device) + past
        c = self.config
        rope_attention = rope_table(position_ids, c.head_dim, c.rope_theta)
        rope_state = None
        if c.ss_positional == "rope" and "ss" in c.mixer_types:
            rope_state = rope_attention if c.state_size == c.head_dim else rope_table(position_ids, c.state_size,
                                                                                      c.rope_theta)
        token_mask = None if attention_mask is None else attention_mask[:, past:]
        hidden_states = (h,) if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, rope_attention, rope_state, token_mask, attention_mask, cache)
            if output_hidden_states:
                hidden_states += (h,)
        if static:
            cache.position.add_(l)
        elif cache is not None:
            cache.seen_tokens = past + l
        return self.norm(h), hidden_states

    @staticmethod
    def _static_past(cache: TransXSSMStaticCache, h, l, attention_mask, position_ids):
        """The position of the first new token: the device position tensor for one token (nothing read on the
        host, so the step can be captured), an int read once for longer inputs (prefill; checked against
        max_length)."""
        if attention_mask is not None:
            raise ValueError("TransXSSMStaticCache takes unpadded batches only (the attention_mask has zeros); "
                             "decode left-padded batches with TransXSSMCache")
        if position_ids is not None:
            raise ValueError("TransXSSMStaticCache: positions come from the cache; pass no position_ids")
        cache.allocate(h.shape[0], h.device, h.dtype)
        if l == 1:
            return cache.position
        past = int(cache.position)
        if past + l > cache.max_length:
            raise ValueError(f"TransXSSMStaticCache: {past} cached + {l} new tokens exceed max_length "
                             f"{cache.max_length}; make the cache with a larger max_length")
        return past


class TransXSSMForCausalLM(TransXSSMPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: TransXSSMConfig):
        super().__init__(config)
        self.model = TransXSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, cache=None, **unused):
        """input_ids (b, l); attention_mask (b, cached + l) with 0 for (left) padding. A TransXSSMCache (as `cache`
        or `past_key_values`) is advanced in place; `use_cache=True` without one starts a new cache."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, TransXSSMCache):
            raise TypeError(f"TransXSSMForCausalLM needs a TransXSSMCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = TransXSSMCache(self.config)
        hidden, all_hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                        bool(output_hidden_states))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden, **{_CACHE_FIELD: cache})

    # -- generation -------------------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a TransXSSMCache (never a DynamicCache) under the name this transformers version uses."""
        given = model_kwargs.get("cache") or model_kwargs.get("past_key_values")
        if given is not None:
            if not isinstance(given, TransXSSMCache):
                raise TypeError(f"generate(): pass a TransXSSMCache or no cache, not {type(given).__name__}")
            return
        if generation_config.use_cache is not False:
            model_kwargs[_CACHE_KWARG] = TransXSSMCache(self.config)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, cache=None, **kwargs):
        """Only the tokens the cache has not seen yet go in; positions come from the attention mask."""
        cache = cache if cache is not None else past_key_values
        seen = cache.seen_tokens if isinstance(cache, TransXSSMCache) else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, _CACHE_KWARG: cache}
        if inputs_embeds is not None and seen == 0:
            inputs.update(input_ids=None, inputs_embeds=inputs_embeds)
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        for key in ("output_hidden_states", "return_dict", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs
