"""`transxssm generate`: stream a continuation of a prompt to stdout.

    transxssm generate --checkpoint exports/x --prompt "The capital of France is" --max-new-tokens 64
    transxssm generate --checkpoint runs/x/checkpoints/iter_0010000 --prompt "..." --temperature 0.8 --seed 1

--checkpoint is an export folder or a megatron checkpoint (converted on the fly, loading.py). Generation runs
through `model.generate()` with the hybrid cache (O(1) work per token in SS layers); temperature 0 is greedy.
The prompt is printed first, then the new text as it is decoded; generation stops at <|endoftext|>.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import torch


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
