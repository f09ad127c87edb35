"""The static decode path: TransXSSMStaticCache against the growing TransXSSMCache, DecodeGraph's step (eager here;
the CUDA graph replay is tests/gpu/test_hf_gpu.py) for TransXSSM and for transformers' Llama with its StaticCache,
and the property that makes the step capturable: it reads no tensor value on the host.

Tolerance: fp32 logits within 1e-5 absolute of the dynamic path's (measured: up to 1.8e-7, on logits of magnitude
about 1; attention runs over all max_length slots, the unused ones masked, so its sums add in another order).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_cases import REPO, small_model_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from transxssm_megatron.hf import names
from transxssm_megatron.hf.configuration_transxssm import TransXSSMConfig
from transxssm_megatron.hf.generate import DecodeGraph
from transxssm_megatron.hf.modeling_transxssm import (_CACHE_KWARG, TransXSSMCache, TransXSSMForCausalLM,
                                                      TransXSSMStaticCache)

ATOL = 1e-5
STEPS = 16


def _transxssm(arch: str, seed: int = 0) -> TransXSSMForCausalLM:
    cfg = small_model_config(arch, vocab_size=300)
    torch.manual_seed(seed)
    return TransXSSMForCausalLM(TransXSSMConfig(**names.transxssm_config_dict(cfg, torch.float32, {}))).eval()


def _llama(seed: int = 0) -> LlamaForCausalLM:
    """The `transformer` baseline as `transxssm convert` exports it: a plain Llama."""
    cfg = small_model_config("transformer", vocab_size=300)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**names.llama_config_dict(cfg, torch.float32, {}))).eval()


def _prompt(batch: int = 2, length: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids, cache):
    return model(input_ids=ids, use_cache=True, **{_CACHE_KWARG: cache}).logits


@pytest.mark.parametrize("arch", ["transxssm", "jamba", "mamba2"])   # RoPE on B/C; conv states; no attention layer
def test_static_cache_gives_the_dynamic_cache_logits(arch):
    model, prompt = _transxssm(arch), _prompt()
    with torch.no_grad():
        dynamic, static = TransXSSMCache(model.config), TransXSSMStaticCache(model.config, max_length=40)
        want, got = _forward(model, prompt, dynamic), _forward(model, prompt, static)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        token = want[:, -1:].argmax(-1)
        for _ in range(STEPS):
            want, got = _forward(model, token, dynamic), _forward(model, token, static)
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            token = want[:, -1:].argmax(-1)
    assert static.seen_tokens == dynamic.seen_tokens == 21 + STEPS
    ss = model.config.mixer_types.index("ss")
    assert static.ssm_states[ss].shape == dynamic.ssm_states[ss].shape


def _greedy(step: DecodeGraph, first: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = [first, step(first).clone()]
    tokens += [step().clone() for _ in range(steps - 1)]
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("arch", ["transxssm", "jamba"])
def test_decode_step_is_greedy_decoding_and_survives_a_refill(arch):
    """DecodeGraph's tokens are the argmax of full forwards; after reset() and a new prefill into the same buffers
    (what a replayed graph needs) it decodes the new prompt as a fresh cache would."""
    model = _transxssm(arch)
    with torch.no_grad():
        cache = TransXSSMStaticCache(model.config, max_length=21 + STEPS)
        step = None
        for seed in (1, 2):
            prompt = _prompt(seed=seed)
            cache.reset()
            first = _forward(model, prompt, cache)[:, -1:].argmax(-1)
            if step is None:
                step = DecodeGraph(model, cache, batch_size=2)
            step.restart()
            assert not step.graph and step.position == 21
            generated = _greedy(step, first, STEPS)
            full = model(torch.cat((prompt, generated[:, :-1]), dim=1)).logits[:, -STEPS - 1:]
            assert torch.equal(full.argmax(-1), generated), seed
        with pytest.raises(RuntimeError, match="static cache is full"):
            step()


def test_llama_static_cache_through_the_step_equals_its_dynamic_decode():
    model, prompt = _llama(), _prompt()
    with torch.no_grad():
        dynamic, static = DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=40)
        want, got = _forward(model, prompt, dynamic), _forward(model, prompt, static)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        step = DecodeGraph(model, static, batch_size=2)
        token = want[:, -1:].argmax(-1)
        for _ in range(STEPS):
            want = _forward(model, token, dynamic)[:, -1]
            got_token = step(token)
            torch.testing.assert_close(step.logits, want, rtol=0, atol=ATOL)
            token = want.argmax(-1, keepdim=True)
            assert torch.equal(got_token, token)


class _HostReads(TorchDispatchMode):
    """Records the ops that bring a tensor value to the host (.item(), bool(), int(), data-dependent shapes): on
    CUDA each is a synchronisation, and inside torch.cuda.graph capture an error."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["transxssm", "jamba", "llama"])
def test_the_static_step_reads_nothing_on_the_host(which):
    if which == "llama":
        model = _llama()
        cache = StaticCache(config=model.config, max_cache_len=30)
    else:
        model = _transxssm(which)
        cache = TransXSSMStaticCache(model.config, max_length=30)
    prompt = _prompt()
    with torch.no_grad():
        _forward(model, prompt, cache)
        step = DecodeGraph(model, cache, batch_size=2)
        step(prompt[:, -1:])
        with _HostReads() as reads:
            step()
    assert reads.ops == []
    with _HostReads() as reads:   # the recorder sees what it looks for
        bool(prompt.any())
    assert reads.ops


def test_generate_with_a_static_cache_equals_the_default():
    model, prompt = _transxssm("jamba"), _prompt(batch=1)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        got = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             **{_CACHE_KWARG: TransXSSMStaticCache(model.config, max_length=33)})
    assert torch.equal(got, want)


def test_static_cache_refuses_what_it_cannot_hold():
    model, prompt = _transxssm("jamba"), _prompt()
    with torch.no_grad():
        mask = torch.ones_like(prompt)
        mask[0, :3] = 0
        with pytest.raises(ValueError, match="unpadded batches only"):
            model(prompt, attention_mask=mask, past_key_values=TransXSSMStaticCache(model.config, max_length=40))
        with pytest.raises(ValueError, match="exceed max_length 20"):
            model(prompt, past_key_values=TransXSSMStaticCache(model.config, max_length=20))
        cache = TransXSSMStaticCache(model.config, max_length=40)
        model(prompt, past_key_values=cache)
        with pytest.raises(ValueError, match="batch size 2"):
            model(prompt[:1, :1], past_key_values=cache)


def test_inference_bench_runs_the_static_decode_loop(tmp_path):
    """bench/inference.py --decode graph on CPU: the static caches stepped eagerly (rows say `static`), the first
    case of each model checked against a full forward."""
    cmd = [sys.executable, str(REPO / "bench" / "inference.py"), "--device", "cpu", "--tiny", "--contexts", "64",
           "--batches", "1,2", "--decode-tokens", "4", "--repeats", "1", "--check", "--decode", "graph", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "inference-speed.json").read_text())["rows"]
    assert [(r["model"], r["batch"], r["decode"], r["error"]) for r in rows] == [
        (m, b, "static", None) for b in (1, 2) for m in ("transxssm", "transformer")]
    assert [r["check_ok"] for r in rows] == [True, True, None, None]
    assert [r["check_agreement"] for r in rows] == [1.0, 1.0, None, None]
