"""The Hugging Face model on CUDA: its fused Triton SSD prefill against its pure PyTorch chunked path, the same
model and inputs, random weights (never zeros). Skipped without CUDA.

    python -m pytest tests/gpu/test_hf_gpu.py -q

Compared (relative norm): the logits of a left-padded batch, the SSM states the prefill leaves in the cache, and
the logits of 8 decode steps fed the same tokens after each prefill. Tolerance 5e-3 in fp32 (the kernel's dots run
in tf32); 5e-2 in bf16, where two different bf16 computations are compared, each up to 2e-2 from the exact result
(tests/gpu/test_rope_ssd_gpu.py), their errors adding up over 7 SS layers (measured on an H200: up to 4.5e-2 for
the transxssm states, 1.0e-2 for jamba).

The static decode path (hf/generate.py, DecodeGraph): the CUDA graph's replayed logits against the same static step
run eagerly, from the same cache contents and fed the same tokens, for TransXSSM (TransXSSMStaticCache) and the Llama
export (transformers' StaticCache). The replay runs the kernels the capture recorded, so equality is expected;
tolerance 1e-5 (fp32) and 1e-2 (bf16) leaves room for cuBLAS picking another algorithm on the capture stream. The
static prefill is also held to the growing cache's within TOL (it passes a zero initial state to the fused SSD).
"""

import inspect

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert b.norm() > 0
    return ((a - b).norm() / b.norm()).item()


def build(architecture: str, dtype: torch.dtype):
    from transxssm_megatron.config import ModelConfig
    from transxssm_megatron.hf import names
    from transxssm_megatron.hf.configuration_transxssm import TransXSSMConfig
    from transxssm_megatron.hf.modeling_transxssm import TransXSSMForCausalLM

    # Kernel-sized SS layers (N = 64, P = 64, chunk 64) in the hybrid pattern, attention at layer 7.
    cfg = ModelConfig.from_preset("tiny", architecture=architecture, hidden_size=256, num_attention_heads=4,
                                  ss_groups=4, state_size=64, ss_chunk_size=64, max_seq_length=1024)
    torch.manual_seed(0)
    model = TransXSSMForCausalLM(TransXSSMConfig(**names.transxssm_config_dict(cfg, torch.float32, {})))
    return model.to("cuda", dtype).eval()


def prefill_and_decode(model, ids, mask, steps):
    from transxssm_megatron.hf.modeling_transxssm import TransXSSMCache

    cache = TransXSSMCache(model.config)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    states = [s.clone() for s in cache.ssm_states if s is not None]
    decode = []
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        decode.append(model(input_ids=steps[:, t:t + 1], attention_mask=mask, past_key_values=cache,
                            use_cache=True).logits)
    return out.logits, states, torch.cat(decode, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ["transxssm", "jamba"])
def test_fused_prefill_matches_pure_pytorch(architecture, dtype, monkeypatch):
    from transxssm_megatron.hf import modeling_transxssm as modeling

    assert modeling._fused_rope_ssd is not None, "transxssm_kernels does not import on this CUDA machine"
    model = build(architecture, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 300), generator=g, device="cuda")  # a partial last chunk
    mask = torch.ones_like(ids)
    mask[1, :37] = 0                                                                         # left padding
    steps = torch.randint(0, model.config.vocab_size, (3, 8), generator=g, device="cuda")

    calls = []
    fused_fn = modeling._fused_rope_ssd
    monkeypatch.setattr(modeling, "_fused_rope_ssd", lambda *a, **k: calls.append(1) or fused_fn(*a, **k))
    with torch.no_grad():
        fused = prefill_and_decode(model, ids, mask, steps)
    assert calls, "the fused kernel did not run"
    monkeypatch.setattr(modeling, "_fused_rope_ssd", None)
    with torch.no_grad():
        reference = prefill_and_decode(model, ids, mask, steps)

    real = mask.bool()
    errors = {"prefill logits": rel(fused[0][real], reference[0][real]),
              "ssm states": max(rel(a, b) for a, b in zip(fused[1], reference[1])),
              "decode logits": rel(fused[2], reference[2])}
    print(architecture, dtype, {k: f"{v:.1e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]:g}: {bad}"


GRAPH_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def build_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from transxssm_megatron.config import ModelConfig
    from transxssm_megatron.hf import names

    cfg = ModelConfig.from_preset("tiny", architecture="transformer", hidden_size=256, num_attention_heads=4,
                                  max_seq_length=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**names.llama_config_dict(cfg, torch.float32, {})))
    return model.to("cuda", dtype).eval()


def cache_tensors(cache) -> list:
    """Every tensor a static cache holds (TransXSSMStaticCache or transformers' StaticCache), position included."""
    if hasattr(cache, "ssm_states"):
        stores = (cache.key_cache, cache.value_cache, cache.ssm_states, cache.conv_states, [cache.position])
        return [t for store in stores for t in store if t is not None]
    return [t for layer in cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["transxssm", "jamba", "llama"])
def test_decode_graph_replays_the_eager_static_step(which, dtype):
    from transformers import DynamicCache, StaticCache

    from transxssm_megatron.hf.generate import DecodeGraph
    from transxssm_megatron.hf.modeling_transxssm import TransXSSMCache, TransXSSMStaticCache

    steps = 8
    model = build_llama(dtype) if which == "llama" else build(which, dtype)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (3, 300), generator=g, device="cuda")
    feed = torch.randint(0, model.config.vocab_size, (3, steps), generator=g, device="cuda")
    if which == "llama":
        cache, dynamic = StaticCache(config=model.config, max_cache_len=320), DynamicCache(config=model.config)
    else:
        cache, dynamic = TransXSSMStaticCache(model.config, max_length=320), TransXSSMCache(model.config)
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def decode(graph: bool):
        step = DecodeGraph(model, cache, batch_size=3, graph=graph)
        logits = []
        for t in range(steps):
            step(feed[:, t:t + 1])
            logits.append(step.logits.clone())
        return step, torch.stack(logits, dim=1)

    with torch.no_grad():
        static_prefill = model(input_ids=ids, use_cache=True, **{key: cache}).logits
        dynamic_prefill = model(input_ids=ids, use_cache=True, **{key: dynamic}).logits
        saved = [t.clone() for t in cache_tensors(cache)]
        _, eager = decode(graph=False)
        for t, s in zip(cache_tensors(cache), saved):   # in place: the graph is captured on these addresses
            t.copy_(s)
        step, replayed = decode(graph=True)
    assert step.captured and step.calls == steps and step.warmup < steps - 1

    errors = {"prefill, static vs growing cache": rel(static_prefill, dynamic_prefill),
              "decode, graph vs eager (all steps)": rel(replayed, eager),
              "decode, graph vs eager (replayed steps)": rel(replayed[:, step.warmup + 1:], eager[:, step.warmup + 1:])}
    print(which, dtype, {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["prefill, static vs growing cache"] < TOL[dtype], errors
    assert errors["decode, graph vs eager (all steps)"] < GRAPH_TOL[dtype], errors
    assert errors["decode, graph vs eager (replayed steps)"] < GRAPH_TOL[dtype], errors
