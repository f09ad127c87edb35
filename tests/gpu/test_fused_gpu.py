"""The fused training paths on one CUDA GPU against their eager references: forward and backward, random inputs.

Tolerances, as relative norms ||fused - ref|| / ||ref||:
- each compiled elementwise op (model/fused_ops.py; SwiGLU: its Triton kernels) against the same function run
  eagerly: 1e-5 for fp32 results, 1e-2 for bf16 ones (both compute in fp32 inside and round once; the compiled one
  may reorder sums, which moves a bf16 result by one unit in the last place at most);
- the chunked LM head + cross-entropy against full logits through F.cross_entropy: loss 1e-5, gradients 1e-2
  (the bf16 gradient of the logits is rounded once, before its matmuls, in both);
- weight gradients added into an fp32 buffer by the matmul (training/wgrad_accumulation.py), two micro-batches,
  against float64: 1e-5 (fp32 sums of bf16 products), and at least 10x closer than the bf16 gradient added
  afterwards (megatron's path without apex, rounded to bf16 per micro-batch: ~2e-3);
- whole models, bf16 parameters, fused against `set_fusion(False)` on the same weights and tokens: loss 2e-3, every
  parameter's gradient 5e-2 (bf16 activations rounded at different points along 4 layers).

    python -m pytest tests/gpu/test_fused_gpu.py -q
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# The product is imported inside the tests: importing the model at collection time would build the Triton kernels
# before tests/kernels switches them to the CPU interpreter (a CPU run collects this file too).


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def compare_op(fn, args: list, tol_bf16: float = 1e-2, tol_fp32: float = 1e-5) -> None:
    """fn's compiled twin against fn.reference on `args` (tensors that are floating point get gradients)."""
    from transxssm_megatron.model import fused_ops

    outs = {}
    for name, impl in (("fused", fn), ("eager", fn.reference)):
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
        fused_ops.set_fusion(name == "fused")
        try:
            out = impl(*leaves)
        finally:
            fused_ops.set_fusion(True)
        out = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        g = torch.Generator(device="cuda").manual_seed(5)
        cot = [torch.randn(o.shape, device="cuda", generator=g).to(o.dtype) for o in out]
        diff = [o for o in out if o.requires_grad]
        if diff:
            torch.autograd.backward(diff, [c for o, c in zip(out, cot) if o.requires_grad])
        outs[name] = [o.detach() for o in out] + [a.grad for a in leaves if torch.is_tensor(a) and a.grad is not None]
    assert len(outs["fused"]) == len(outs["eager"])
    for i, (a, b) in enumerate(zip(outs["fused"], outs["eager"])):
        assert torch.isfinite(a).all() and b.abs().sum() > 0, f"{fn.__name__} output/grad {i}"
        tol = tol_fp32 if a.dtype == torch.float32 else tol_bf16
        err = rel(a, b)
        assert err < tol, f"{fn.__name__} output/grad {i}: relative error {err:.2e} over {tol:g}"


def rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def test_compiled_elementwise_ops_match_eager(monkeypatch):
    from transxssm_megatron.model import fused_ops

    torch.manual_seed(0)
    l, b, d = 512, 2, 768
    h, update, w = rand(l, b, d), rand(l, b, d), rand(d, scale=0.1) + 1
    compare_op(fused_ops.rms_norm, [h, w, 1e-6])
    compare_op(fused_ops.skip_add, [h, w, update])
    compare_op(fused_ops.skip_add_norm, [h, w, update, rand(d, scale=0.1) + 1, 1e-6])
    compare_op(fused_ops.skip_add_norm, [h, None, update, w, 1e-6])
    wide = [rand(l, b, 2048), rand(2048, scale=0.1) + 1, rand(l, b, 2048), rand(2048, scale=0.1) + 1, 1e-5]
    compare_op(fused_ops.skip_add_norm, wide)                   # the 1.3b width: two rows per program
    compare_op(fused_ops.swiglu, [rand(l, b, 2 * 1024)])
    cos, sin = torch.randn(2, l, 32, device="cuda").unbind(0)
    compare_op(fused_ops.rotate_qkv, [rand(l, b, 4, 3, 64), cos, sin, 1])
    compare_op(fused_ops.rotate_qkv, [rand(l, b, 2, 4, 64), cos[None].expand(b, -1, -1).contiguous(),
                                      sin[None].expand(b, -1, -1).contiguous(), 2])
    compare_op(fused_ops.split_projection, [rand(l, b, 4 * (64 + 256)), 4, (0, 64, 128, 128), None, None])
    with_conv = [rand(l, b, 4 * (128 + 128 + 256)), 4, (128, 128, 128, 128), rand(4 * 384, 1, 4, scale=0.3),
                 rand(4 * 384, scale=0.1)]
    monkeypatch.delenv("TRANSXSSM_CONV_KERNELS", raising=False)
    compare_op(fused_ops.split_projection, with_conv)           # transxssm_kernels.causal_conv
    monkeypatch.setenv("TRANSXSSM_CONV_KERNELS", "0")
    compare_op(fused_ops.split_projection, with_conv)           # compiled
    monkeypatch.delenv("TRANSXSSM_CONV_KERNELS")
    compare_op(fused_ops.gate_norm, [rand(l, b, 4, 64), rand(l, b, 4, 64), rand(4, dtype=torch.float32),
                                     rand(l, b, 4, 64), rand(256) + 1, 1e-6, 128])


def test_norm_weight_gradients_into_main_grad_match_float64():
    """skip_add_norm's backward adding both weights' gradients into fp32 main_grad buffers (two micro-batches)
    against float64 autograd: 1e-5 (fp32 sums of bf16 products, as the linear layers' accumulation)."""
    from transxssm_megatron.model import fused_ops

    torch.manual_seed(2)
    l, b, d = 1024, 2, 2048
    w = (rand(d, scale=0.1) + 1).requires_grad_(True)
    v = (rand(d, scale=0.1) + 1).requires_grad_(True)
    w.main_grad, v.main_grad = torch.zeros(d, device="cuda"), torch.zeros(d, device="cuda")
    want = [torch.zeros(d, dtype=torch.float64, device="cuda") for _ in range(2)]
    for _ in range(2):
        h, update, dout, dnormed = (rand(l, b, d) for _ in range(4))
        out, normed = fused_ops.skip_add_norm(h, w, update, v, 1e-5, into_main_grad=True)
        torch.autograd.backward([out, normed], [dout, dnormed])
        assert w.grad_added_to_main_grad and v.grad_added_to_main_grad
        w64, v64 = (t.detach().double().requires_grad_(True) for t in (w, v))
        out64 = h.double() * w64 + update.double()
        x = out64 + (out.double() - out64).detach()   # the norm reads h' as stored (bf16), as the eager one does
        normed64 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * v64
        torch.autograd.backward([out64, normed64], [dout.double(), dnormed.double()])
        want[0] += w64.grad
        want[1] += v64.grad
    assert rel(w.main_grad, want[0]) < 1e-5 and rel(v.main_grad, want[1]) < 1e-5


def test_cross_entropy_pieces_match_eager():
    from transxssm_megatron.model.lm_loss import cross_entropy_grad, logsumexp_and_target

    logits = rand(1000, 5000, scale=3.0)
    target = torch.randint(-100, 5000, (1000,), device="cuda")
    valid = (target >= 0) & (target < 5000)
    mask = (torch.rand(1000, device="cuda") > 0.2).float()
    compare_op(logsumexp_and_target, [logits, target, valid])
    lse = torch.logsumexp(logits.float(), -1)
    compare_op(cross_entropy_grad, [logits, lse, target, valid, mask])

    from transxssm_kernels.cross_entropy import cross_entropy_rows   # the one-kernel path at TP = 1

    got_lse, got_picked, got_grad = cross_entropy_rows(logits, target, valid, mask)
    want_lse, want_picked = logsumexp_and_target.reference(logits, target, valid)
    assert rel(got_lse, want_lse) < 1e-6 and rel(got_picked, want_picked) < 1e-6
    assert rel(got_grad, cross_entropy_grad.reference(logits, want_lse, target, valid, mask)) < 1e-2


def test_linear_cross_entropy_matches_full_logits_bf16():
    from transxssm_megatron.model.lm_loss import linear_cross_entropy

    torch.manual_seed(1)
    T, d, V = 5000, 512, 50304
    hidden = rand(T, d).requires_grad_(True)
    weight = rand(V, d, scale=0.05).requires_grad_(True)
    labels = torch.randint(0, V, (T,), device="cuda")
    mask = (torch.rand(T, device="cuda") > 0.1).float()
    loss = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=2048)   # 2 full chunks + a tail
    (loss * 0.5).backward()
    got = [loss.detach(), hidden.grad, weight.grad]
    hidden.grad = weight.grad = None
    ref = (F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="none") * mask).sum()
    (ref * 0.5).backward()
    assert rel(got[0], ref.detach()) < 1e-5
    for name, a, b in (("d hidden", got[1], hidden.grad), ("d weight", got[2], weight.grad)):
        assert rel(a, b) < 1e-2, f"{name}: {rel(a, b):.2e}"


def test_wgrad_accumulation_matches_float64():
    from transxssm_megatron.training import wgrad_accumulation

    assert wgrad_accumulation.supported()
    torch.manual_seed(0)
    main_grad = torch.randn(384, 256, device="cuda")
    fused, separate, exact = main_grad.clone(), main_grad.clone(), main_grad.double()
    for _ in range(2):   # two micro-batches into the same buffer
        x, g = rand(2048, 256), rand(2048, 384)
        wgrad_accumulation.accumulate_fp32(x, g, fused)
        separate.add_(g.t() @ x)
        exact += g.double().t() @ x.double()
    assert rel(fused, exact) < 1e-5
    assert rel(fused, exact) * 10 < rel(separate, exact)


@pytest.mark.parametrize("architecture", ["transxssm", "jamba", "transformer"])
def test_model_fused_matches_reference(architecture):
    """320m-shaped, 4 layers (attention every 2nd), bf16: loss and every gradient, fused against the eager path."""
    from gpu_helpers import build

    from transxssm_megatron.config import ModelConfig
    from transxssm_megatron.model import fused_ops

    cfg = ModelConfig.from_preset("320m", architecture=architecture, num_layers=4, attention_period=2,
                                  attention_offset=1)
    model = build(cfg, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 1025), device="cuda", generator=g)
    mask = (torch.rand(2, 1024, device="cuda", generator=g) > 0.1).float()
    results = {}
    for fused in (False, True):
        fused_ops.set_fusion(fused)
        try:
            model.zero_grad(set_to_none=True)
            loss = model(tokens[:, :-1], None, labels=tokens[:, 1:], loss_mask=mask)
            loss.backward()
        finally:
            fused_ops.set_fusion(True)
        results[fused] = (loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
    print(f"{architecture}: loss eager {ref_loss.item():.5f} fused {loss.item():.5f}")
    assert rel(loss, ref_loss) < 2e-3
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        err = rel(grads[name], ref)
        assert err < 5e-2, f"{name}: relative gradient error {err:.2e}"
