"""Inference speed of the Hugging Face models: TransXSSM beside the `transformer` baseline of the same size.

    python bench/inference.py --out DIR [--size 320m] [--contexts 4096,16384] [--batches 1,32]
                              [--decode-tokens 64] [--repeats 3] [--device cuda] [--decode graph|static|eager]
                              [--tiny] [--check]

The models are what `transxssm convert --to hf` writes for configs/SIZE.yaml (TransXSSMForCausalLM, remote code)
and configs/transformer_SIZE.yaml (a plain LlamaForCausalLM), built from the same config functions
(transxssm_megatron/hf/names.py) with random weights, in bf16 on CUDA (fp32 on CPU). Per model, context length l
and batch b, on random prompts:
  prefill   one forward over b x l tokens that fills an empty cache (logits of the last position only, as generate()
            does): b * l / seconds, median of --repeats after one untimed prefill + 3 decode steps;
  decode    then --decode-tokens greedy single-token steps in the same loop for both models (not generate()):
            b * steps / seconds, and ms per step. --decode picks the step (recorded per row as `decode`):
              eager   model(input_ids=next, cache, use_cache=True) on the growing cache (TransXSSMCache /
                      DynamicCache), one kernel launch per PyTorch operation; the default on CPU;
              graph   a static cache (TransXSSMStaticCache / transformers' StaticCache, sized context + 3 + steps)
                      and the step captured once as a CUDA graph and replayed (hf/generate.py, DecodeGraph); the
                      default on CUDA. On CPU the same static step runs eagerly and the row says `static`;
              static  the static cache stepped eagerly (what the graph replays, without the graph);
            the 3 untimed decode steps are the graph's 2 warm-up steps and its capture;
  memory    bytes of the cache tensors after the prefill / b (KV of attention layers, SSM and conv state of SS
            layers; a static cache counts all its slots), and peak allocated GPU memory of the case (its model's
            weights included, not the other's).
`ssd_path` is the SSD path the SS layers announce for the prefill (fused Triton kernels when transxssm_kernels
imports on CUDA); a decode step always runs the recurrent step. A case that runs out of memory is recorded as
{"error": "out of memory"} and the run goes on. --check compares, in each model's first case, the loop's tokens with
the argmax of one full forward over prompt + generated tokens (`check_ok`; `check_agreement`, the fraction of tokens
that agree, and at the first that does not, the full forward's margin between its best token and the loop's, beside
the spread of its logits: with random weights the logits are nearly flat, and in bf16 a near-tie can go either way).
--tiny shrinks both models to 8 layers of width 64 (the same layer pattern) for a CPU smoke run. Both models stay
resident and the cases alternate between them, the JSON rewritten after each, so a run cut short still pairs every
case it finished.

Writes OUT/inference-speed.json: `rows` (model, size, context, batch, decode, prefill_tokens_per_s,
decode_tokens_per_s, decode_ms_per_step, cache_bytes_per_sequence, peak_mem_gib, ssd_path, check_ok,
check_agreement, check_first_mismatch, error),
`ratios` (transxssm / transformer per context and batch), the date, commit, GPU, versions and the command. Prints a
short table at the end; the goal quoted for the project is decode >= 1.5x at 16K, batch 32.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from run_record import environment

REPO = Path(__file__).resolve().parents[1]
MODELS = ("transxssm", "transformer")
WARM_STEPS = 3   # untimed decode steps: DecodeGraph's 2 warm-up steps and its capture
TINY = dict(hidden_size=64, num_layers=8, num_attention_heads=2, num_query_groups=2, ss_groups=2,
            ffn_hidden_size=128, state_size=16, ss_chunk_size=16)


class SSDPath(logging.Handler):
    """The SSD path the SS layers log (once per path and process, on the first prefill that takes it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.path = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "SSD" in message:
            self.path = message.split(": ", 1)[-1]


def build(model: str, size: str, tiny: bool, device: str, dtype: torch.dtype):
    """(model, cache factory): the export `transxssm convert --to hf` writes for configs/[transformer_]SIZE.yaml.
    new_cache() is the growing cache, new_cache(max_length) the static one."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

    from transxssm_megatron.hf import names
    from transxssm_megatron.hf.configuration_transxssm import TransXSSMConfig
    from transxssm_megatron.hf.modeling_transxssm import TransXSSMCache, TransXSSMForCausalLM, TransXSSMStaticCache
    from transxssm_megatron.training.run_config import RunConfig

    name = size if model == "transxssm" else f"transformer_{size}"
    cfg = RunConfig.load(REPO / "configs" / f"{name}.yaml", need_data=False).model
    if tiny:
        cfg = type(cfg).from_dict({**cfg.to_dict(), **TINY})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    # Built in `dtype` on the device, as from_pretrained(dtype=...) builds it: buffers created as fp32 stay fp32.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if model == "transformer":  # fresh skip weights are all 1: convert writes a plain Llama
                config = LlamaConfig(**names.llama_config_dict(cfg, dtype, {}))
                net = LlamaForCausalLM(config)
                cache = lambda max_length=None: DynamicCache(config=config) if max_length is None else \
                    StaticCache(config=config, max_cache_len=max_length)
            else:
                config = TransXSSMConfig(**names.transxssm_config_dict(cfg, dtype, {}))
                net = TransXSSMForCausalLM(config)
                cache = lambda max_length=None: TransXSSMCache(config) if max_length is None else \
                    TransXSSMStaticCache(config, max_length)
    finally:
        torch.set_default_dtype(default)
    return net.eval(), cache


def tensors_of(obj, depth: int = 3):
    """The tensors a cache object holds (in lists, tuples and attributes, a few levels down)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_of(item, depth - 1)
    elif depth and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from tensors_of(item, depth - 1)


def case(model, new_cache, context: int, batch: int, args, check: bool) -> dict:
    from transxssm_megatron.hf.generate import DecodeGraph, cache_argument

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    key = cache_argument(model)
    g = torch.Generator(device=device).manual_seed(context + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=g, device=device)
    static = args.decode != "eager"
    # A static cache is made once and refilled by each prefill: the captured graph holds its addresses.
    static_cache = new_cache(context + WARM_STEPS + args.decode_tokens) if static else None

    def prefill(cache):
        logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def fresh_cache():
        if static_cache is None:
            return new_cache()
        static_cache.reset()
        return static_cache

    cache = fresh_cache()
    token = prefill(cache)
    if static:
        step = DecodeGraph(model, cache, batch, graph=None if args.decode == "graph" else False)   # None: on CUDA
        advance = lambda cache, token: step(token).clone()   # the step's output buffer is overwritten next call
    else:
        advance = lambda cache, token: model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1].argmax(
            -1, keepdim=True)
    for _ in range(WARM_STEPS):
        token = advance(cache, token)
    times = []
    for _ in range(args.repeats):
        del cache, token   # one cache alive at a time
        cache = fresh_cache()
        sync()
        start = time.perf_counter()
        token = prefill(cache)
        sync()
        times.append(time.perf_counter() - start)
    if static:
        step.restart()
    held = {t.data_ptr(): t.numel() * t.element_size() for t in tensors_of(cache)}
    tokens = [token]
    sync()
    start = time.perf_counter()
    for _ in range(args.decode_tokens):
        tokens.append(advance(cache, tokens[-1]))
    sync()
    decode_s = time.perf_counter() - start
    row = {"decode": ("graph" if step.captured else "static") if static else "eager",
           "prefill_tokens_per_s": batch * context / statistics.median(times),
           "decode_tokens_per_s": batch * args.decode_tokens / decode_s,
           "decode_ms_per_step": decode_s * 1e3 / args.decode_tokens,
           "cache_bytes_per_sequence": sum(held.values()) // batch}
    if check:
        if static:
            del step
        del cache, static_cache
        generated = torch.cat(tokens, dim=1)   # (b, steps + 1): t0 from the prefill, then one per step
        full = model(input_ids=torch.cat((prompt, generated[:, :-1]), dim=1), use_cache=False,
                     logits_to_keep=generated.shape[1]).logits
        same = full.argmax(-1) == generated
        row["check_ok"] = bool(same.all())
        row["check_agreement"] = same.float().mean().item()
        if not row["check_ok"]:
            # A near-tie decides the token: how far the full forward's best logit is above the token the loop chose,
            # at the first position where they differ (random weights give nearly flat logits; bf16 rounds them)
            b, t = map(int, (~same).nonzero()[0])
            logits = full[b, t].float()
            row["check_first_mismatch"] = {"sequence": b, "step": t,
                                           "margin": (logits.max() - logits[generated[b, t]]).item(),
                                           "logit_std": logits.std().item()}
    return row


def measure(name: str, model, new_cache, context: int, batch: int, args, check: bool, announced: SSDPath) -> dict:
    """One row; out of memory is recorded, not raised. Peak memory counts this model's weights, not the other's."""
    row = {"model": name, "size": "tiny" if args.tiny else args.size, "context": context, "batch": batch,
           "decode": None, "prefill_tokens_per_s": None, "decode_tokens_per_s": None, "decode_ms_per_step": None,
           "cache_bytes_per_sequence": None, "peak_mem_gib": None, "ssd_path": None, "check_ok": None,
           "check_agreement": None, "check_first_mismatch": None, "error": None}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with torch.inference_mode():
            row.update(case(model, new_cache, context, batch, args, check))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    gc.collect()   # the failed case's tensors go with its frame
    if cuda:
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
        torch.cuda.empty_cache()
    if name == "transxssm":
        row["ssd_path"] = announced.path
    return row


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["model"], r["context"], r["batch"]): r for r in rows}
    out = []
    for (model, context, batch), ours in by.items():
        base = by.get(("transformer", context, batch))
        if model != "transxssm" or base is None:
            continue
        ratio = lambda k: ours[k] / base[k] if ours.get(k) and base.get(k) else None
        out.append({"context": context, "batch": batch, "prefill": ratio("prefill_tokens_per_s"),
                    "decode": ratio("decode_tokens_per_s")})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for inference-speed.json")
    parser.add_argument("--size", default="320m", choices=("320m", "1.3b"))
    parser.add_argument("--contexts", default="4096,16384", help="prompt lengths, comma-separated")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps after each prefill")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per case (the median is kept)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--decode", choices=("graph", "static", "eager"), default=None,
                        help="decode step: CUDA graph over a static cache (default on CUDA), the static step "
                        "eagerly, or the growing cache eagerly (default on CPU)")
    parser.add_argument("--tiny", action="store_true", help="8 layers of width 64, same layer pattern (CPU smoke)")
    parser.add_argument("--check", action="store_true", help="first case of each model: decode tokens == argmax "
                        "of a full forward")
    args = parser.parse_args()
    if args.repeats < 1 or args.decode_tokens < 1:
        parser.error("--repeats and --decode-tokens: give at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; pass --device cpu (with --tiny for a quick run)")
    if args.decode is None:
        args.decode = "graph" if args.device == "cuda" else "eager"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--contexts {args.contexts} --batches {args.batches}: give comma-separated integers, "
                     "e.g. --contexts 4096,16384 --batches 1,32")
    if min(contexts + batches) < 1:
        parser.error("--contexts and --batches: every value must be >= 1")
    from transxssm_megatron.hf import modeling_transxssm

    announced = SSDPath()
    logging.getLogger(modeling_transxssm.__name__).addHandler(announced)
    logging.getLogger(modeling_transxssm.__name__).setLevel(logging.INFO)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "inference-speed.json"
    result = {"benchmark": "inference-speed", **environment("triton", "transformers"),
              "dtype": str(dtype).split(".")[-1],
              "decode_tokens": args.decode_tokens, "repeats": args.repeats, "rows": [], "ratios": []}
    # Both models resident, cases interleaved: a run cut short still pairs every case it finished.
    models = {name: build(name, args.size, args.tiny, args.device, dtype) for name in MODELS}
    for context in contexts:
        for batch in batches:
            for name, (model, new_cache) in models.items():
                check = args.check and not any(r["model"] == name for r in result["rows"])   # its first case
                row = measure(name, model, new_cache, context, batch, args, check, announced)
                result["rows"].append(row)
                result["ratios"] = ratios(result["rows"])
                path.write_text(json.dumps(result, indent=1))
                speed = row["error"] or f"prefill {row['prefill_tokens_per_s']:,.0f}, decode " \
                    f"{row['decode_tokens_per_s']:,.0f} tokens/s ({row['decode']})"
                print(f"[bench] {name} l={context} b={batch}: {speed}", flush=True)

    fmt = lambda x, f: f.format(x) if x is not None else "-"
    print(f"\n{'model':<13}{'context':>8}{'batch':>6}{'prefill tok/s':>15}{'decode':>8}{'decode tok/s':>14}"
          f"{'ms/step':>9}{'cache MiB/seq':>15}{'peak GiB':>10}  error / SSD path")
    for r in result["rows"]:
        print(f"{r['model']:<13}{r['context']:>8}{r['batch']:>6}{fmt(r['prefill_tokens_per_s'], '{:,.0f}'):>15}"
              f"{r['decode'] or '-':>8}"
              f"{fmt(r['decode_tokens_per_s'], '{:,.0f}'):>14}{fmt(r['decode_ms_per_step'], '{:.2f}'):>9}"
              f"{fmt(r['cache_bytes_per_sequence'] and r['cache_bytes_per_sequence'] / 2**20, '{:.2f}'):>15}"
              f"{fmt(r['peak_mem_gib'], '{:.1f}'):>10}  {r['error'] or r['ssd_path'] or ''}")
    print("\ntransxssm / transformer (tokens/s)")
    for r in result["ratios"]:
        goal = "  (goal: decode >= 1.5x)" if (r["context"], r["batch"]) == (16384, 32) else ""
        print(f"  l={r['context']:<6} b={r['batch']:<3} prefill {fmt(r['prefill'], '{:.2f}x'):>7}  "
              f"decode {fmt(r['decode'], '{:.2f}x'):>7}{goal}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
