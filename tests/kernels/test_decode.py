"""rope_ssd_decode_step: a chunked prefill followed by decode steps reproduces the full-sequence output."""

import pytest
import torch

from transxssm_kernels.rope_ssd import rope_ssd_decode_step, ssd_chunked_reference, ssd_naive

from ssd_cases import make_inputs, rel_err, rope_tables


def decode_tokens(state, args, kw, start, stop):
    """Decode tokens start..stop-1 one by one (absolute positions); return y (b, stop-start, H, P)."""
    step_kw = {k: kw[k] for k in ("D", "dt_bias", "dt_softplus") if k in kw}
    ys = []
    for t in range(start, stop):
        if "rope_cos" in kw:
            cos, sin = kw["rope_cos"], kw["rope_sin"]
            step_kw["rope_cos"], step_kw["rope_sin"] = (cos[:, t], sin[:, t]) if cos.dim() == 3 else (cos[t], sin[t])
        if "z" in kw:
            step_kw["z"] = kw["z"][:, t]
        ys.append(rope_ssd_decode_step(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t],
                                       args["C"][:, t], **step_kw))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("prefill", [1, 13, 16])
@pytest.mark.parametrize("rope,per_batch,options,G", [(True, True, True, 2), (True, False, False, 4),
                                                      (False, False, True, 1)])
def test_prefill_then_decode_equals_full_sequence(prefill, rope, per_batch, options, G):
    b, l, H, P, N = 2, 24, 4, 8, 16
    args, kw = make_inputs(b, l, H, P, G, N, seed=prefill, rope=rope, per_batch_rope=per_batch, options=options)
    y_full, state_full = ssd_chunked_reference(**args, **kw, chunk_size=8, return_final_state=True)

    head = {k: (v if k == "A" else v[:, :prefill]) for k, v in args.items()}
    head_kw = dict(kw)
    for k in ("z", "rope_cos", "rope_sin"):
        if k in kw:
            head_kw[k] = kw[k][..., :prefill, :] if k.startswith("rope") else kw[k][:, :prefill]
    y_head, state = ssd_chunked_reference(**head, **head_kw, chunk_size=8, return_final_state=True)
    state_before = state
    y_tail = decode_tokens(state, args, kw, prefill, l)
    assert state is state_before  # updated in place
    assert rel_err(torch.cat((y_head, y_tail), dim=1), y_full) < 1e-10
    assert rel_err(state, state_full) < 1e-10


def test_decode_from_initial_state_matches_naive_low_precision_io():
    """bf16 x/B/C with an fp32 state: the state stays fp32, y comes back in bf16, close to the float64 definition."""
    b, l, H, P, G, N = 2, 12, 4, 8, 2, 16
    args, kw = make_inputs(b, l, H, P, G, N, seed=4, dtype=torch.bfloat16)
    up = lambda d: {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in d.items()}
    y64, s64 = ssd_naive(**up(args), **up(kw), return_final_state=True)
    kw["rope_cos"], kw["rope_sin"] = kw["rope_cos"].float(), kw["rope_sin"].float()
    state = kw.pop("initial_state").float()
    y = decode_tokens(state, args, kw, 0, l)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(state.double(), s64) < 1e-5
    assert rel_err(y.double(), y64) < 1.5e-2


def test_decode_shape_errors():
    b, H, P, G, N = 2, 4, 8, 2, 16
    state = torch.zeros(b, H, P, N)
    x, dt, A = torch.randn(b, H, P), torch.rand(b, H), -torch.rand(H)
    B, C = torch.randn(b, G, N), torch.randn(b, G, N)
    with pytest.raises(ValueError, match=r"^A must have shape \(4,\)"):
        rope_ssd_decode_step(state, x, dt, A[:, None], B, C)
    with pytest.raises(ValueError, match=r"^state must have shape \(2, 4, 8, 16\)"):
        rope_ssd_decode_step(state[..., :8], x, dt, A, B, C)
    cos, sin = rope_tables(torch.tensor([3, 4]), N)
    with pytest.raises(ValueError, match=r"^rope_cos must have shape \(b, N//2\)=\(2, 8\)"):
        rope_ssd_decode_step(state, x, dt, A, B, C, rope_cos=cos[:, :4], rope_sin=sin)
    with pytest.raises(ValueError, match=r"state must be fp32"):
        rope_ssd_decode_step(state.bfloat16(), x, dt, A, B, C)
