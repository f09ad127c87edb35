"""The remote-code model on its own: SSD port vs the kernel package's reference, cached generation vs full forwards,
left padding, and loading from nothing but the export folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hf_cases import make_export, small_model_config

from transxssm_megatron.hf import names
from transxssm_megatron.hf.configuration_transxssm import TransXSSMConfig
from transxssm_megatron.hf.modeling_transxssm import TransXSSMCache, TransXSSMForCausalLM, ssd_chunked, ssd_step


def _model(arch: str, seed: int = 0, **overrides) -> TransXSSMForCausalLM:
    cfg = small_model_config(arch, vocab_size=300, **overrides)
    torch.manual_seed(seed)
    return TransXSSMForCausalLM(TransXSSMConfig(**names.transxssm_config_dict(cfg, torch.float32, {}))).eval()


def test_ssd_port_is_the_reference_bit_for_bit():
    from transxssm_kernels.rope_ssd import rope_ssd_decode_step, ssd_chunked_reference
    from transxssm_kernels.rope_ssd.naive import compute_delta

    g = torch.Generator().manual_seed(0)
    b, l, H, P, G, N = 2, 45, 4, 8, 2, 16
    x, dt = torch.randn(b, l, H, P, generator=g), torch.randn(b, l, H, generator=g)
    B, C = torch.randn(b, l, G, N, generator=g), torch.randn(b, l, G, N, generator=g)
    A, bias = -torch.rand(H, generator=g) - 0.5, torch.randn(H, generator=g)
    cos, sin = torch.randn(l, N // 2, generator=g), torch.randn(l, N // 2, generator=g)
    state0 = torch.randn(b, H, P, N, generator=g)
    y_ref, s_ref = ssd_chunked_reference(x, dt, A, B, C, chunk_size=16, dt_bias=bias, dt_softplus=True, rope_cos=cos,
                                         rope_sin=sin, initial_state=state0, return_final_state=True)
    delta = compute_delta(dt, bias, True, torch.float32)
    y, s = ssd_chunked(x, delta, A, B, C, chunk_size=16, rope_cos=cos, rope_sin=sin, initial_state=state0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)

    state_ref, state = s_ref.clone(), s_ref.clone()
    y_ref = rope_ssd_decode_step(state_ref, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], dt_bias=bias, dt_softplus=True,
                                 rope_cos=cos[:2, :], rope_sin=sin[:2, :])
    y = ssd_step(state, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], cos[:2, :], sin[:2, :])
    assert torch.equal(y, y_ref) and torch.equal(state, state_ref)


@pytest.mark.parametrize("arch", ["transxssm", "jamba"])
def test_greedy_generate_equals_argmax_of_full_forwards(arch):
    model = _model(arch)
    prompt = torch.randint(2, 300, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        seq = prompt
        for _ in range(32):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_cache_continues_exactly_and_ss_state_does_not_grow():
    model = _model("jamba")  # conv1d, z-gate, D, dt_bias and one attention layer
    ids = torch.randint(2, 300, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = TransXSSMCache(model.config)
        parts = [model(ids[:, a:z], past_key_values=cache).logits
                 for a, z in ((0, 20), (20, 21), (21, 37), (37, 50))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    ss = [i for i, kind in enumerate(model.config.mixer_types) if kind == "ss"]
    assert all(cache.ssm_states[i].shape == (2, 2, 32, 16) and cache.key_cache[i] is None for i in ss)
    assert cache.conv_states[ss[0]].shape[1] == model.config.ss_conv_width - 1
    assert cache.key_cache[7].shape[2] == 50 and cache.seen_tokens == 50


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = _model("jamba", seed=3)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(2, 300, (1, n), generator=g) for n in (9, 17)]
    width = max(r.shape[1] for r in rows)
    padded = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=1) for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    with torch.no_grad():
        batch = model.generate(padded, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=1)
        for i, row in enumerate(rows):
            alone = model.generate(row, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=1)
            assert torch.equal(batch[i, width:], alone[0, row.shape[1]:]), i


def test_loads_from_the_export_folder_alone(tmp_path):
    """A fresh interpreter, cwd elsewhere, no PYTHONPATH, and transxssm_megatron / transxssm_kernels made
    unimportable: only the export folder (and the HF modules cache it populates) is there."""
    folder = make_export("jamba", tmp_path / "export")
    (tmp_path / "elsewhere").mkdir()
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["transxssm_megatron"] = None   # an import of either package now raises ImportError
        sys.modules["transxssm_kernels"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ids = tokenizer("Hello world", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        print(json.dumps([type(model).__module__, ids.tolist(), out.shape[1]]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "elsewhere", env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    module, ids, length = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.") and ids == [[12092, 1533]] and length == 7
