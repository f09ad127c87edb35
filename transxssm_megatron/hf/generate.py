"""`transxssm generate`: stream a continuation of a prompt to stdout.

    transxssm generate --checkpoint exports/x --prompt "The capital of France is" --max-new-tokens 64
    transxssm generate --checkpoint runs/x/checkpoints/iter_0010000 --prompt "..." --temperature 0.8 --seed 1

--checkpoint is an export folder or a megatron checkpoint (converted on the fly, loading.py). Generation runs
through `model.generate()` with the hybrid cache (O(1) work per token in SS layers); temperature 0 is greedy.
The prompt is printed first, then the new text as it is decoded; generation stops at <|endoftext|>.

`DecodeGraph` is the fast decode step for benchmarks and long greedy loops: one single-token step of a causal LM
over a static cache (`TransXSSMStaticCache`, or transformers' `StaticCache` for a Llama), captured once as a CUDA
graph and replayed, so that a step costs one graph launch instead of one launch per PyTorch operation.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Optional, TextIO

import torch

logger = logging.getLogger(__name__)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: Optional[int] = None, stream: Optional[TextIO] = None) -> str:
    """The generated continuation of `prompt` (without the prompt); written to `stream` as it is produced."""
    if temperature < 0:
        raise ValueError(f"--temperature {temperature}: must be >= 0 (0 is greedy decoding)")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ValueError("--prompt: empty after tokenization; give some text to continue")
    if seed is not None:
        torch.manual_seed(seed)
    streamer = None
    if stream is not None:
        streamer = _streamer(tokenizer, stream)
        stream.write(prompt)
        stream.flush()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cache_argument(model) -> str:
    """The name under which `model.forward` takes its cache: `cache` from transformers 5.2x, `past_key_values`
    before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DecodeGraph:
    """Greedy single-token decode steps of `model` over a static cache, replayed as a CUDA graph.

        cache = TransXSSMStaticCache(model.config, max_length=prompt_len + new_tokens)   # or StaticCache(config=...,
        model(input_ids=prompt, cache=cache, use_cache=True)                               #   max_cache_len=...)
        step = DecodeGraph(model, cache, batch_size=prompt.shape[0])
        token = step(first_token)           # (b, 1) int64 -> the next greedy token (b, 1)
        for _ in range(n): token = step()   # continue from the token the last step produced

    Every call is one real decode step (the cache advances by one token). With `graph` (default: on CUDA) the first
    `warmup` calls run eagerly on a side stream (lazy cuBLAS / kernel setup must not happen under capture), the next
    one is captured with torch.cuda.graph and replayed, and later calls only replay; capture runs no kernel, so the
    warm-up steps are ordinary steps and nothing is undone. Without `graph` (CPU) each call runs the same static step
    eagerly. The cache must hold its buffers already (after a prefill) and keep them: the graph reads and writes those
    addresses, so refill it with `cache.reset()` + a prefill, then call `restart()`, never swap its tensors.

    The returned token and `logits` (b, V) are buffers the next call overwrites: clone what is kept.
    """

    def __init__(self, model, cache, batch_size: int, *, graph: Optional[bool] = None, warmup: int = 2):
        device = next(model.parameters()).device
        self.graph = device.type == "cuda" if graph is None else graph
        if self.graph and device.type != "cuda":
            raise ValueError(f"DecodeGraph(graph=True): CUDA graphs need a CUDA model, this one is on {device}")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.cache_key = cache_argument(model)
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)   # the step's input
        self.logits: Optional[torch.Tensor] = None
        self.calls = 0
        self._cuda_graph = None
        capacity = cache.get_max_length()
        if capacity is None or capacity < 1:
            raise ValueError(f"DecodeGraph needs a static cache (TransXSSMStaticCache, transformers' StaticCache), "
                             f"got a {type(cache).__name__}, whose tensors grow and move")
        self.capacity = int(capacity)
        self.restart()
        logger.info("DecodeGraph: %s decode steps %s", type(model).__name__,
                    f"replayed as a CUDA graph after {warmup} eager warm-up steps" if self.graph else
                    f"run eagerly on the static cache (on {device.type}, no CUDA graph)")

    @property
    def captured(self) -> bool:
        """True once the step replays as a CUDA graph."""
        return self._cuda_graph is not None

    def restart(self) -> None:
        """Re-read the cache's position (one host sync), after it was reset and refilled by a new prefill."""
        self.position = int(self.cache.get_seq_length())

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.tokens, use_cache=True, **{self.cache_key: self.cache})
        logits = out.logits[:, -1]
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        return logits

    @torch.no_grad()
    def __call__(self, token: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.position >= self.capacity:
            raise RuntimeError(f"DecodeGraph: the static cache is full ({self.capacity} positions); make it with a "
                               "larger max length")
        if token is not None:
            self.tokens.copy_(token)
        if self._cuda_graph is not None:
            self._cuda_graph.replay()
        elif not self.graph:
            self.logits = self._step()
        elif self.calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.logits = self._step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._step()
            graph.replay()
            self._cuda_graph = graph
        self.calls += 1
        self.position += 1
        return self.tokens


def _streamer(tokenizer, stream: TextIO):
    """transformers' TextStreamer writing to `stream` instead of print()."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text)
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run(args) -> int:
    from transxssm_megatron.hf.loading import load_causal_lm

    model, tokenizer, _ = load_causal_lm(args.checkpoint, device=args.device, dtype=args.dtype, config=args.config)
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, stream=sys.stdout)
    return 0
