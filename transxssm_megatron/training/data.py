"""Training data: preprocessed Megatron prefixes -> GPTDataset (blended, split) -> micro-batches.

    datasets = build_datasets(cfg, world, num_train_samples, num_valid_samples)
    batches = train_batches(datasets.train, consumed_samples, cfg, world)   # iterator of dict micro-batches
    valid = valid_batches(datasets.valid, cfg, world)                      # same fixed samples every call

The data position is one integer, `consumed_samples` (global samples seen so far). Step k of any run reads
global samples [k * B, (k+1) * B) with B = global batch; inside a step, micro-batch j of DP rank r holds
samples [j * m * DP + r * m, ... + m) (m = micro batch). Resuming at any `consumed_samples` — with any DP size —
therefore continues the exact same sample sequence.

Each batch: tokens (m, l) int64, labels (m, l) int64, loss_mask (m, l) fp32, position_ids (m, l) int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from transxssm_megatron.config import ConfigError


@dataclass
class TokenizerInfo:
    """What GPTDataset needs to know about the tokenizer: size and end-of-document id (no pad token)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # megatron hashes this into the dataset cache key
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


@dataclass
class Datasets:
    train: object
    valid: Optional[object]


def check_prefixes(prefixes: list[str]) -> None:
    """Fail fast, naming the missing file and how to make it."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = Path(str(prefix) + suffix)
            if not path.is_file():
                raise ConfigError(
                    f"data.prefixes: {path} does not exist. Give the prefix without .bin/.idx, as produced by "
                    f"`transxssm-preprocess run --output-prefix PREFIX`, or use data.mode=mock")


def _blend(prefixes: list, weights: Optional[list]) -> tuple[list[str], Optional[list[float]]]:
    """megatron's blend tuple; no weights means weights proportional to each prefix's token count.

    (megatron's own `None` builds a single epoch weighted by split sizes, so a prefix whose validation split
    holds no full sequence gets weight 0 and fails deep inside BlendedDataset; token weights avoid that.)"""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = [str(p) for p in prefixes]
    if weights is None and len(prefixes) > 1:
        weights = [_token_count(IndexedDataset(p)) for p in prefixes]
    return prefixes, weights


def _token_count(dataset) -> float:
    # Sum while `dataset` is alive: sequence_lengths is a view into its mmap, closed when it is collected.
    return float(dataset.sequence_lengths.sum())


def build_datasets(cfg, world, num_train_samples: int, num_valid_samples: int) -> Datasets:
    """GPTDataset (or MockGPTDataset) splits through BlendedMegatronDatasetBuilder. Collective over all ranks."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d = cfg.data
    mock = d.mode == "mock"
    if not mock:
        check_prefixes(d.prefixes)
    cache = d.cache_dir or str(cfg.run_dir / "data_cache")
    blend = None if mock else _blend(d.prefixes, d.weights)
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
        split=d.split,
        path_to_cache=None if mock else cache,
        tokenizer=TokenizerInfo(vocab_size=cfg.model.vocab_size, eod=d.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,   # causal masking is the model's job
        mid_level_dataset_surplus=0.1,
    )
    sizes = [num_train_samples, num_valid_samples, 0]
    cls = MockGPTDataset if mock else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, ds_config).build()
    if train is None:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents")
    return Datasets(train=train, valid=valid if num_valid_samples > 0 else None)


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask",
                                                                       "position_ids")}
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def train_batches(dataset, consumed_samples: int, cfg, world) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for this DP rank from global sample `consumed_samples` on, forever (wraps the dataset).

    Each group of m * DP consecutive global samples is one micro-batch of every DP rank; rank r takes its
    r-th block of m."""
    from megatron.core import parallel_state

    m = cfg.train.micro_batch_size
    first = consumed_samples + parallel_state.get_data_parallel_rank() * m
    n = len(dataset)
    while True:
        yield _collate([dataset[i % n] for i in range(first, first + m)])
        first += m * world.dp


def valid_batches(dataset, cfg, world) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the valid split from its first sample on (the same ones at every
    evaluation; over all DP ranks, `eval_iters` global batches cover the first eval_iters * global_batch)."""
    return train_batches(dataset, 0, cfg, world)
