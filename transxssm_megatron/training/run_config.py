"""The run configuration: one validated object, loaded from YAML, overridable from the command line.

    cfg = RunConfig.load("configs/320m.yaml", ["train.steps=100", "optim.lr=1e-3", "model.num_layers=12"])
    cfg.save("runs/x/config.yaml")      # the resolved config, exactly what the run used

Sections: `model` (ModelConfig fields, optionally `preset:`), `parallel`, `train`, `optim`, `data`,
`checkpoint`, `logging`. Overrides are `dotted.key=value` with the value parsed as YAML (`1e-3`, `true`,
`[a, b]`, `null`); an unknown section or key is rejected by name with the closest known spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from transxssm_megatron.config import ConfigError, ModelConfig


@dataclass
class ParallelConfig:
    tp: int = 1                          # tensor parallel size
    pp: int = 1                          # pipeline parallel size
    vpp: Optional[int] = None            # virtual pipeline stages per rank (interleaved schedule); None = off
    sequence_parallel: bool = False      # megatron sequence parallelism (needs tp > 1)
    cp: int = 1                          # context parallel size: the sequence split over cp ranks, all-to-alls
                                         # to head shards around attention and the SS scan (docs/training.md)
    use_distributed_optimizer: bool = True  # shard optimizer state over DP (GPU only; CPU uses the plain one)
    overlap_grad_reduce: bool = False    # reduce each gradient bucket over DP while the backward goes on
    overlap_param_gather: bool = False   # all-gather each bucket's updated parameters (distributed optimizer)
                                         # during the next forward, as its layers need them


@dataclass
class TrainConfig:
    steps: int = 1000                    # optimizer steps
    seq_length: int = 2048               # tokens per sample
    micro_batch_size: int = 4            # samples per forward pass per data-parallel rank
    global_batch_size: int = 512         # samples per optimizer step (all DP ranks, all micro-batches)
    seed: int = 1234
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    max_consecutive_skips: int = 10      # stop after this many NaN/inf steps in a row
    eval_interval: int = 500             # validation every N steps (0: only at the end)
    eval_iters: int = 10                 # validation batches of global_batch_size samples (Megatron-LM's)
    eval_at_start: bool = False          # also validate before the first step (after a resume: checks the load)
    device: str = "auto"                 # auto | cuda | cpu
    deterministic: bool = False          # torch deterministic algorithms (bitwise-repeatable runs)
    fused: bool = True                   # torch.compile the elementwise work between matmuls (CUDA) and run the LM
                                         # head + cross-entropy chunked; false: the eager reference path
    wgrad_fusion: bool = True            # with `fused` on CUDA: linear layers (and the norms' backward kernel)
                                         # add their weight gradients into the fp32 gradient buffer (megatron's
                                         # gradient accumulation fusion); false: bf16 weight gradients added by a
                                         # separate kernel
    cuda_graph: Optional[bool] = None    # replay each step's forward+backward as one captured CUDA graph: takes
                                         # the CPU's kernel launches out of the step (GPU only); null: on for a
                                         # one-GPU run with `fused`, without `recompute` or `deterministic`
    recompute: bool = False              # recompute each sub-layer's activations in backward: far less activation
                                         # memory (long contexts, larger micro-batches) for ~1/3 more compute
    recompute_layers: Optional[int] = None  # with `recompute`: only the first N decoder layers of each pipeline
                                         # (or virtual) stage are recomputed, the rest keep their activations;
                                         # None: all layers
    exit_after_steps: Optional[int] = None  # stop (with a checkpoint) after reaching this step; for demos/tests
    time_limit_minutes: Optional[float] = None  # stop (with a checkpoint) once training ran this long


@dataclass
class OptimConfig:
    lr: float = 3e-4                     # peak learning rate
    min_lr_ratio: float = 0.1            # cosine decays to min_lr_ratio * lr (SPEC §7: 10% of peak)
    warmup_fraction: float = 0.1         # linear warmup over this fraction of train.steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class DataConfig:
    mode: str = "gpt"                    # gpt (preprocessed .bin/.idx prefixes) | mock (synthetic, for benchmarks)
    prefixes: list = field(default_factory=list)  # dataset prefixes (PREFIX.bin / PREFIX.idx)
    weights: Optional[list] = None       # blend weights, one per prefix (None: proportional to size)
    split: str = "98,2,0"                # train,valid,test proportions of each prefix's documents
    valid_prefixes: list = field(default_factory=list)  # held-out validation prefixes: when given, `prefixes`
                                         # are all training data and `split` is not used
    eod_id: int = 0                      # <|endoftext|> in GPT-NeoX-20B
    eod_mask_loss: bool = False          # do not train on predicting the token after EOD
    cache_dir: Optional[str] = None      # GPTDataset index cache (None: <run_dir>/data_cache)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None            # None: <run_dir>/checkpoints
    interval: int = 1000                 # save every N steps (0: only at the end / on preemption)
    keep_last: int = 3                   # keep the newest K complete checkpoints (0: keep all)
    resume: str = "auto"                 # auto (latest complete checkpoint in dir, if any) | none | PATH
    save_at_end: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"        # where config.yaml, metrics.jsonl, tensorboard/ and checkpoints go
    interval: int = 10                   # console/JSONL line every N steps
    tensorboard: bool = True             # when the tensorboard package is installed
    wandb: bool = False                  # when the wandb package is installed
    wandb_project: str = "transxssm"
    peak_tflops: Optional[float] = None  # per-device peak for MFU (None: looked up from the GPU name)


SECTIONS: dict[str, type] = {
    "parallel": ParallelConfig, "train": TrainConfig, "optim": OptimConfig, "data": DataConfig,
    "checkpoint": CheckpointConfig, "logging": LoggingConfig,
}


def _closest(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate one value against a dataclass field annotation; raise ConfigError naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if isinstance(annotation, str):  # postponed annotations are resolved by the caller
        raise AssertionError(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-4" (no dot) as a string
        except ValueError:
            pass
    if annotation is list and isinstance(value, tuple):
        return list(value)
    if annotation in (int, float, str, bool, list) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build_section(name: str, cls: type, values: Mapping[str, Any]):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown option{_closest(key, known)}; known: {', '.join(known)}")
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c.d=[x, y]"]` -> nested dict `{"a": {"b": 1}, "c": {"d": ["x", "y"]}}` (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return nested


def _read_with_bases(path: Path, chain: list[Path]) -> dict:
    """A YAML run config; `base: FILE` (relative to this file) names a config that this one overlays: the base is
    read first (its own base before it) and this file's values replace its values key by key, so a variant states
    only what differs (configs/transformer_320m.yaml is configs/320m.yaml with another architecture)."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base:` leads back to itself ({' -> '.join(str(p) for p in chain + [path])})")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: {base} names no file ({base_path}); give a path relative to {path.parent}")
    return _merge(_read_with_bases(base_path, chain + [path.resolve()]), data)


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RunConfig:
    """Everything a run needs. `model` is the resolved ModelConfig; the rest are the sections above."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], need_data: bool = True) -> "RunConfig":
        """need_data=False accepts a config that names no data yet (`transxssm config` printing the defaults);
        a run always needs it."""
        known = ["model", *SECTIONS]
        for key in data:
            if key not in known:
                raise ConfigError(f"{key}: unknown config section{_closest(key, known)}; known: {', '.join(known)}")
        try:
            model = ModelConfig.from_dict(data.get("model") or {})
        except ConfigError as err:
            raise ConfigError(f"model.{err}") from None
        except TypeError as err:
            raise ConfigError(f"model: {err}") from None
        sections = {name: _build_section(name, sec, data.get(name) or {}) for name, sec in SECTIONS.items()}
        cfg = cls(model=model, **sections)
        cfg.validate(need_data=need_data)
        return cfg

    @classmethod
    def load(cls, path: Optional[str | Path], overrides: Sequence[str] = (), need_data: bool = True) -> "RunConfig":
        """Read a YAML run config (or start from defaults when `path` is None) and apply overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file; the shipped configs are in configs/ "
                                  f"(tiny.yaml, 320m.yaml, 1.3b.yaml, ...)")
            data = _read_with_bases(path, [])
        return cls.from_dict(_merge(dict(data), parse_overrides(overrides)), need_data=need_data)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict()}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        return out

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ------------------------------------------------------------------------------------------ checks
    def validate(self, need_data: bool = True) -> None:
        """Checks that do not need the world size (`num_microbatches` checks those). Raise ConfigError by
        field; need_data=False skips the one check a printout of the defaults cannot pass (data.prefixes given)."""
        t, o, d, p = self.train, self.optim, self.data, self.parallel
        for name in ("steps", "seq_length", "micro_batch_size", "global_batch_size", "max_consecutive_skips"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(t, name)}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision: {t.precision!r}; choose auto, bf16 or fp32")
        if t.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device: {t.device!r}; choose auto, cuda or cpu")
        if t.seq_length > self.model.max_seq_length:
            raise ConfigError(f"train.seq_length: {t.seq_length} exceeds model.max_seq_length "
                              f"{self.model.max_seq_length}; raise model.max_seq_length too")
        if t.eval_interval < 0 or t.eval_iters < 0:
            raise ConfigError("train.eval_interval / train.eval_iters: must be >= 0")
        if not 0 < o.lr < 1:
            raise ConfigError(f"optim.lr: {o.lr} is not a sensible peak learning rate (expected 0 < lr < 1)")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: {o.min_lr_ratio} must lie in [0, 1]")
        if not 0 <= o.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction: {o.warmup_fraction} must lie in [0, 1)")
        if d.mode not in ("gpt", "mock"):
            raise ConfigError(f"data.mode: {d.mode!r}; choose gpt (preprocessed prefixes) or mock")
        if need_data and d.mode == "gpt" and not d.prefixes:
            raise ConfigError("data.prefixes: empty; give the preprocessed dataset prefixes (PREFIX.bin/.idx "
                              "from `transxssm-preprocess run`) or set data.mode=mock")
        if d.valid_prefixes and set(map(str, d.valid_prefixes)) & set(map(str, d.prefixes)):
            raise ConfigError("data.valid_prefixes: a prefix is also in data.prefixes; validation data must be "
                              "held out from training")
        if d.weights is not None and len(d.weights) != len(d.prefixes):
            raise ConfigError(f"data.weights: {len(d.weights)} weights for {len(d.prefixes)} prefixes")
        try:
            parts = [float(x) for x in d.split.split(",")]
            assert len(parts) == 3 and min(parts) >= 0 and parts[0] > 0
        except (ValueError, AssertionError):
            raise ConfigError(f"data.split: {d.split!r}; expected three proportions 'train,valid,test', "
                              f"e.g. '98,2,0'") from None
        if self.checkpoint.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last: {self.checkpoint.keep_last}; give the number of checkpoints "
                              f"to keep, or 0 to keep all")
        if t.recompute_layers is not None:
            per_stage = self.model.num_layers // (p.pp * (p.vpp or 1))
            if not t.recompute:
                raise ConfigError("train.recompute_layers: needs train.recompute=true (or recompute_layers: null)")
            if not 1 <= t.recompute_layers <= per_stage:
                raise ConfigError(f"train.recompute_layers: {t.recompute_layers}; give 1 to {per_stage}, the decoder "
                                  f"layers of a pipeline stage (or null: all of them)")
        if p.vpp is not None and (p.vpp < 2 or p.pp < 2):
            raise ConfigError(f"parallel.vpp: {p.vpp}; virtual pipeline stages need parallel.pp >= 2 and vpp >= 2 "
                              f"(or vpp: null)")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tp > 1")
        if p.overlap_param_gather:
            if not (p.use_distributed_optimizer and p.overlap_grad_reduce):
                raise ConfigError("parallel.overlap_param_gather: needs parallel.use_distributed_optimizer=true and "
                                  "parallel.overlap_grad_reduce=true")
            if t.cuda_graph:
                raise ConfigError("parallel.overlap_param_gather: a CUDA graph replay skips the hooks that wait for "
                                  "the gathered parameters; set train.cuda_graph=false or overlap_param_gather=false")
        if p.cp < 1:
            raise ConfigError(f"parallel.cp: {p.cp}; the context parallel size must be >= 1")
        blocks = p.cp * (p.tp if p.sequence_parallel else 1)
        if t.seq_length % blocks:
            raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by "
                              + (f"parallel.cp = {p.cp}" if blocks == p.cp else
                                 f"parallel.cp * parallel.tp = {p.cp} * {p.tp} (context and sequence parallel "
                                 f"blocks)") + "; every rank takes an equal contiguous block of the sequence")
        self.model.validate(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp)

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP * PP * CP); raises ConfigError when the world does not factor."""
        p = self.parallel
        mp_size = p.tp * p.pp * p.cp
        if world_size % mp_size:
            raise ConfigError(f"parallel: tp*pp{'*cp' if p.cp > 1 else ''} = {mp_size} does not divide the world "
                              f"size {world_size}")
        return world_size // mp_size

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per step per DP rank: global_batch / (micro_batch * DP)."""
        dp = self.data_parallel_size(world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size: {self.train.global_batch_size} is not a multiple of "
                              f"micro_batch_size * data_parallel_size = {self.train.micro_batch_size} * {dp}")
        n = self.train.global_batch_size // per_step
        if self.parallel.vpp and n % self.parallel.pp:
            raise ConfigError(f"train.global_batch_size: the interleaved schedule (parallel.vpp) needs the "
                              f"number of micro-batches ({n}) to be a multiple of parallel.pp ({self.parallel.pp})")
        return n

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"
