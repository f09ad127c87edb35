"""The token embedding's lookup with its weight gradient added straight into megatron's fp32 `main_grad`.

    if reproduces_megatron(model.embedding):
        hidden = embed_into_main_grad(model.embedding, input_ids, main_grad)   # (b, l) -> (l, b, d)

Why: where megatron's linear layers add their weight gradients into `param.main_grad` themselves (gradient
accumulation fusion, training/wgrad_accumulation.py), the embedding is the one weight left whose gradient goes the
long way: F.embedding's backward builds a dense (V, d) gradient in bf16 (a fill, a sort and a scatter over every
row) and megatron's DDP hook adds it to the fp32 buffer. Here backward adds the looked-up rows' gradients into
main_grad with one index_add_, in fp32, and returns what the LM head returns after adding its own
(main_grad.weight_grad_stand_in), or nothing with give_grad False: where the two share the weight on one pipeline
stage, the LM head alone hands megatron's hook the stand-in (builder.py).

The forward is megatron's LanguageModelEmbedding over its VocabParallelEmbedding, for the modules
`reproduces_megatron` accepts: ids outside this TP rank's vocabulary range look up row 0 and give zero rows, the
lookup writes the sequence-first (l, b, d) directly (megatron transposes a copy), and the partial rows are summed
over TP with megatron's own region functions: reduce-scattered over the sequence with sequence parallelism
((l / tp, b, d) out), else all-reduced. index_add_ adds in any order on CUDA: deterministic runs keep megatron's
lookup.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from .main_grad import weight_grad_stand_in

log = logging.getLogger(__name__)


class _LookupIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, outside, weight, main_grad, give_grad):
        out = F.embedding(ids, weight)
        if outside is not None:   # masked_fill needs no host sync (megatron's boolean indexing does)
            out.masked_fill_(outside.unsqueeze(-1), 0.0)
        ctx.save_for_backward(ids, outside)
        ctx.weight, ctx.main_grad, ctx.give_grad = weight, main_grad, give_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        ids, outside = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).to(ctx.main_grad.dtype)
        if outside is not None:   # other ranks' tokens looked up row 0 but gave nothing
            rows = rows.masked_fill(outside.reshape(-1, 1), 0.0)
        ctx.main_grad.index_add_(0, ids.reshape(-1), rows)
        return None, None, weight_grad_stand_in(ctx.weight) if ctx.give_grad else None, None, None


def lookup_into_main_grad(ids: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor, give_grad: bool = True,
                          outside: torch.Tensor | None = None) -> torch.Tensor:
    """weight[ids] (ids any shape, int; result ids.shape + (d,)), zero where `outside` (bool, ids' shape); backward
    adds into main_grad (weight's shape, fp32 or weight's dtype) and returns for the weight what the module
    docstring says (give_grad)."""
    if main_grad.shape != weight.shape:
        raise ValueError(f"main_grad must have the embedding's shape {tuple(weight.shape)}, got "
                         f"{tuple(main_grad.shape)}")
    return _LookupIntoMainGrad.apply(ids, outside, weight, main_grad, give_grad)


@functools.cache
def _announce(path: str) -> None:
    log.info("token embedding: %s", path)


def reproduces_megatron(emb) -> bool:
    """Whether `embed_into_main_grad` computes what megatron's LanguageModelEmbedding `emb` does (forward and weight
    gradient) and may run; logs once which lookup runs and why."""
    config, words = emb.config, emb.word_embeddings
    unlike = [what for what, present in (
        ("learned position embeddings", emb.add_position_embedding),
        ("token-type embeddings", emb.num_tokentypes > 0),
        ("embedding dropout", emb.embedding_dropout.p > 0),
        ("MuP embedding scale", getattr(config, "use_mup", False)),
        ("fp32 residual connection", config.fp32_residual_connection),
        ("GTP weight rematerialisation", getattr(words, "gtp_remat_size", 1) > 1),
        ("inference-optimised reduce-scatter", getattr(words, "use_inference_optimized_reduce_scatter", False)),
        ("deterministic mode (index_add_ adds in any order)", config.deterministic_mode),
    ) if present]
    if unlike:
        _announce(f"megatron's lookup and dense weight gradient ({', '.join(unlike)})")
        return False
    _announce("weight gradient added into main_grad by index_add_")
    return True


def embed_into_main_grad(emb, input_ids: torch.Tensor, main_grad: torch.Tensor,
                         give_grad: bool = True) -> torch.Tensor:
    """megatron's `emb(input_ids=input_ids, position_ids=None)` for a module `reproduces_megatron` accepts:
    input_ids (b, l) -> (l, b, d), or (l / tp, b, d) with sequence parallelism; the weight's gradient goes into
    main_grad (this rank's rows, the weight's shape)."""
    words = emb.word_embeddings
    tp_group = words.tp_group
    ids, outside = input_ids.t(), None
    if tp_group.size() > 1:
        outside = (ids < words.vocab_start_index) | (ids >= words.vocab_end_index)
        ids = (ids - words.vocab_start_index).masked_fill(outside, 0)
    out = lookup_into_main_grad(ids, words.weight, main_grad, give_grad, outside)
    if emb.reduce_scatter_embeddings:
        # megatron clones after this only to free the base of a scattered view; a reduce-scatter's output has none
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(out, group=tp_group)
    if tp_group.size() > 1:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(out, group=tp_group)
    return out
