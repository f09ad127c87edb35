"""Full model tensors out of a megatron `torch_dist` checkpoint: one CPU process, no GPU, no process group.

megatron-core's dist_checkpointing saves every sharded tensor under its global key with its global shape
(torch.distributed.checkpoint metadata), whatever the TP/PP/DP layout that wrote it. So torch's own reader
(`FileSystemReader` + `dcp.load(..., no_dist=True)`) fills preallocated full-size tensors by itself: no
resharding logic of ours, and the same code reads TP=1 and TP=8/PP=4 checkpoints.

    tensors = read_model_tensors(path, progress=True)     # {"decoder.layers.0.mixer.in_proj.weight": tensor, ...}

Only model weights are read (optimizer state, RNG and `_extra_state` objects are skipped). megatron's
`singleton_local_shards` variant of the SwiGLU fc1 (keys `..._w` and `..._v`) is joined back into one tensor.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_BATCH_BYTES = 256 << 20   # read this much per dcp.load call (the progress bar advances per batch)


def model_tensor_metadata(path: str | Path) -> dict:
    """{key: TensorStorageMetadata} of the model tensors in the checkpoint folder `path`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {key: meta for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES)}


def _batches(keys: list[str], sizes: dict[str, int]) -> Iterable[list[str]]:
    batch, total = [], 0
    for key in keys:
        batch.append(key)
        total += sizes[key]
        if total >= _BATCH_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def read_model_tensors(path: str | Path, progress: bool = False,
                       keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Every model tensor of checkpoint `path` at its full (TP=1, PP=1) shape and saved dtype, on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = {k: m for k, m in model_tensor_metadata(path).items() if keep(k)}
    sizes = {k: m.size.numel() * m.properties.dtype.itemsize for k, m in meta.items()}
    keys = sorted(meta)
    tensors: dict[str, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"reading {Path(path).name}")
    for batch in _batches(keys, sizes):
        state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in batch}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": exactly our intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
        tensors.update(state)
        if bar is not None:
            bar.update(sum(sizes[k] for k in batch))
    if bar is not None:
        bar.close()
    for key in [k for k in tensors if k.endswith("_w") and k[:-2] + "_v" in tensors]:
        tensors[key[:-2]] = torch.cat((tensors.pop(key), tensors.pop(key[:-2] + "_v")), dim=0)
    # The last pipeline stage's copy of the tied embedding is saved under the embedding's key: there is no
    # output_layer tensor (one would be refused by names.check_megatron_tensors as foreign).
    return tensors
