"""Training data: preprocessed Megatron prefixes -> GPTDataset (blended, split) -> micro-batches.

    check_data(cfg)                      # every prefix sound, every needed split non-empty; no process group
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
from typing import Iterator, Optional

import numpy as np
import torch

from transxssm_megatron.config import ConfigError
from transxssm_preprocess.integrity import DatasetError, DatasetSummary, check_dataset


@dataclass
class DatasetTokenizer:
    """What GPTDataset needs to know about the tokenizer: size and end-of-document id (no pad token)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # megatron hashes this into the dataset cache key
        return {"class": "DatasetTokenizer", "vocab_size": self.vocab_size, "eod": self.eod}


@dataclass
class Datasets:
    train: object
    valid: Optional[object]


def check_prefixes(prefixes: list, field: str = "data.prefixes") -> list[DatasetSummary]:
    """Every prefix is a sound, non-empty PREFIX.bin/.idx pair (`transxssm_preprocess.integrity`, the same checks
    as `transxssm-preprocess validate`). Reads only the .idx arrays and the .bin size (about 0.1 s for a 100 MB
    index), no megatron objects and no process group. Raises ConfigError naming the file, the fault and the
    command that rebuilds it."""
    summaries = []
    for prefix in prefixes:
        try:
            summaries.append(check_dataset(prefix))
        except DatasetError as err:
            raise ConfigError(f"{field}: {err}") from None
    return summaries


def check_data(cfg, need_valid: Optional[bool] = None) -> list[DatasetSummary]:
    """check_prefixes, then that each split the run reads can feed it: train always, valid when `need_valid`
    (default: train.eval_iters > 0) and data.split gives it a share. With data.valid_prefixes, the training
    prefixes and the validation prefixes each hold at least one sample in all.

    Splits are computed as megatron's BlendedMegatronDatasetBuilder cuts them: each prefix's *sequences* (one
    per document in our data) [round(lo * S), round(hi * S)) for the bounds that megatron's own
    parse_and_normalize_split / convert_split_vector_to_split_matrix give. Two conditions:
      - every prefix holds at least one token in each needed split: GPTDataset repeats a split's documents
        until it has the samples it was asked for, and loops forever on a split with no tokens;
      - the prefixes together hold at least one sample (train.seq_length + 1 tokens) in each needed split. A
        single prefix's small split is allowed below that (the blend repeats it), but a whole split shorter than
        one sample would be the same few documents over and over: a wrong split or far too little data."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)

    d, t = cfg.data, cfg.train
    summaries = check_prefixes(d.prefixes)
    need_valid = t.eval_iters > 0 if need_valid is None else need_valid
    if d.valid_prefixes:   # whole prefixes per split, data.split unused
        sets = [("data.prefixes", summaries)]
        if need_valid:
            sets.append(("data.valid_prefixes", check_prefixes(d.valid_prefixes, "data.valid_prefixes")))
        for name, found in sets:
            total = sum(s.tokens for s in found)
            if total < t.seq_length + 1:
                raise ConfigError(f"{name}: {total} tokens in all, less than one sample of train.seq_length + 1 = "
                                  f"{t.seq_length + 1} tokens; give more data or a shorter train.seq_length")
        return summaries
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.split))
    if bounds[0] is None:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents; give the first (train) "
                          "proportion a share, e.g. data.split=98,2,0")
    needed = [("train", bounds[0], "more data or a shorter train.seq_length")]
    if need_valid and bounds[1] is not None:
        needed.append(("valid", bounds[1], "a larger valid share (e.g. data.split=90,10,0), more data, or "
                                           "train.eval_iters=0 (no validation)"))
    sample = t.seq_length + 1
    for name, (lo, hi), fix in needed:
        total = 0
        for s in summaries:
            first, end = int(round(lo * s.sequences)), int(round(hi * s.sequences))
            tokens = int(s.sequence_lengths[first:end].sum(dtype=np.int64))
            if tokens == 0:
                raise ConfigError(f"data.split: {d.split!r} gives {s.prefix}.bin/.idx no {name} tokens "
                                  f"({end - first} of its {s.sequences} documents); use {fix}")
            total += tokens
        if total < sample:
            where = ", ".join(f"{s.prefix}.bin/.idx" for s in summaries)
            raise ConfigError(f"data.split: the {name} split of {where} holds {total} tokens, less than one sample "
                              f"of train.seq_length + 1 = {sample} tokens; use {fix}")
    return summaries


def _blend(prefixes: list, weights: Optional[list]) -> tuple[list[str], Optional[list[float]]]:
    """megatron's blend tuple; no weights means weights proportional to each prefix's token count.

    (megatron's own `None` builds a single epoch weighted by split sizes, so a prefix whose validation split
    holds no full sequence gets weight 0 and fails deep inside BlendedDataset; token weights avoid that.)"""
    prefixes = [str(p) for p in prefixes]
    if weights is None and len(prefixes) > 1:
        weights = [float(s.tokens) for s in check_prefixes(prefixes)]
    return prefixes, weights


def build_datasets(cfg, world, num_train_samples: int, num_valid_samples: int) -> Datasets:
    """GPTDataset (or MockGPTDataset) splits through BlendedMegatronDatasetBuilder. Collective over all ranks."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d = cfg.data
    mock = d.mode == "mock"
    if not mock:
        check_data(cfg, need_valid=num_valid_samples > 0)  # before megatron reads a byte (it would hang or crash)
    cache = d.cache_dir or str(cfg.run_dir / "data_cache")
    blend = None if mock else _blend(d.prefixes, d.weights)
    per_split = None
    if not mock and d.valid_prefixes:   # held-out validation files: each split reads its own prefixes whole
        per_split, blend = [blend, _blend(d.valid_prefixes, None), None], None
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=None if per_split else d.split,
        path_to_cache=None if mock else cache,
        tokenizer=DatasetTokenizer(vocab_size=cfg.model.vocab_size, eod=d.eod_id),
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


def context_parallel_block(batch: dict[str, torch.Tensor], cp_rank: int, cp: int) -> dict[str, torch.Tensor]:
    """This CP rank's contiguous block of every (b, l) tensor: positions [cp_rank * l/cp, (cp_rank + 1) * l/cp).
    No load balancing is needed: attention and the SS scan see the whole sequence after the mixers' all-to-all."""
    if cp == 1:
        return batch
    out = {}
    for key, t in batch.items():
        block = t.shape[1] // cp
        out[key] = t[:, cp_rank * block:(cp_rank + 1) * block].contiguous()
    return out


def train_batches(dataset, consumed_samples: int, cfg, world) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for this DP rank from global sample `consumed_samples` on, forever (wraps the dataset).

    Each group of m * DP consecutive global samples is one micro-batch of every DP rank; rank r takes its
    r-th block of m. The CP ranks of a DP rank read the same samples and each keeps its block of the sequence.
    On a GPU the tensors are in pinned memory: their copies to the device queue behind the running step instead
    of waiting for it."""
    from megatron.core import parallel_state

    m = cfg.train.micro_batch_size
    first = consumed_samples + parallel_state.get_data_parallel_rank() * m
    cp_rank = parallel_state.get_context_parallel_rank() if world.cp > 1 else 0
    n = len(dataset)
    while True:
        batch = context_parallel_block(_collate([dataset[i % n] for i in range(first, first + m)]), cp_rank, world.cp)
        yield {key: t.pin_memory() for key, t in batch.items()} if world.on_gpu else batch
        first += m * world.dp


def valid_batches(dataset, cfg, world) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the valid split from its first sample on (the same ones at every
    evaluation; over all DP ranks, `eval_iters` global batches cover the first eval_iters * global_batch)."""
    return train_batches(dataset, 0, cfg, world)
