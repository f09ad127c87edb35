"""Tensor (also with sequence parallelism) and pipeline (also interleaved) parallelism change nothing: same
logits, loss and gradients as one process, from the same weights (2 gloo ranks on CPU, fp32).

The reference (TP=1, PP=1) run returns its full weights; the parallel run loads them by slicing along megatron's
own partition attributes (tests/model/model_parallel_utils.py), so a wrong TP layout of any layer shows up here.
"""

import pytest
import torch
from distributed import run_distributed
from model_parallel_utils import BATCH, SEQ, batch, full_grads, load_full_weights, small_cfg, tp_model_with

TP_CASES = {
    "transxssm": ("transxssm", {}, False),
    "transformer": ("transformer", {}, False),
    "transxssm-sequence-parallel": ("transxssm", {}, True),
    # 2 heads per B/C group and per KV group on each rank; conv1d, D, z-gate + grouped norm, dt_bias all sharded
    "jamba-4heads-G2-gqa": ("jamba", dict(num_attention_heads=4, ss_groups=2, num_query_groups=2), False),
}


def _tp_run(case, full_weights):
    """Logits, per-token loss and TP-gathered gradients; full weights from this run when none are given."""
    architecture, overrides, sequence_parallel = TP_CASES[case]
    model, full_weights = tp_model_with(small_cfg(architecture, **overrides), full_weights, sequence_parallel)
    ids, labels = batch()
    logits = model(ids[0], None, runtime_gather_output=True)
    loss = model(ids[0], None, labels=labels[0])
    loss.mean().backward()
    sp_params = sum(bool(getattr(p, "sequence_parallel", False)) for p in model.parameters())
    return dict(logits=logits.detach(), loss=loss.detach(), grads=full_grads(model), weights=full_weights,
                sp_params=sp_params)


def _pp_run(full_weights, vpp=None):
    """Loss and gradients through megatron's pipeline schedule (2 micro-batches; interleaved with vpp chunks)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from transxssm_megatron.model import build_model, build_transformer_config

    cfg = small_cfg("transxssm")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tc = build_transformer_config(cfg, pp=pp, vpp=vpp, batch_p2p_sync=False)
    chunks = [build_model(cfg, tc, vp_stage=stage) for stage in (range(vpp) if vpp else [None])]
    if full_weights is None:
        full_weights = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    else:
        for chunk in chunks:
            load_full_weights(chunk, full_weights)
    ids, labels = batch(n_micro=2)

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        out = model(x, None, labels=y)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}  # clone: megatron scales `loss` in place

        return out, loss_func

    data = list(zip(ids, labels))
    losses = get_forward_backward_func()(forward_step_func=forward_step,
                                         data_iterator=[iter(data) for _ in chunks] if vpp else iter(data),
                                         model=chunks, num_microbatches=2, seq_length=SEQ,
                                         micro_batch_size=BATCH, forward_only=False)
    grads = _merge_stage_grads([dict(grads=full_grads(chunk)) for chunk in chunks])
    return dict(losses=[float(d["loss"]) for d in losses], grads=grads, weights=full_weights,
                layers=[[layer.layer_number for layer in chunk.decoder.layers] for chunk in chunks])


def _merge_stage_grads(per_rank):
    merged = {}
    for result in per_rank:
        for k, g in result["grads"].items():
            merged[k] = merged[k] + g if k in merged else g
    return merged


def assert_same_grads(got, want, atol=2e-6, rtol=1e-4):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_2_matches_single_process(case):
    architecture, _, sequence_parallel = TP_CASES[case]
    (ref,) = run_distributed(_tp_run, 1, case, None)
    tp0, tp1 = run_distributed(_tp_run, 2, case, ref["weights"], tp=2)
    assert any(k.endswith("A_log") for k in ref["grads"]) == (architecture != "transformer")
    assert (tp0["sp_params"] > 0) == sequence_parallel
    for got in (tp0, tp1):
        torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["loss"], ref["loss"], atol=2e-5, rtol=1e-5)
        assert_same_grads(got["grads"], ref["grads"])
    # the check is not vacuous: gradients are non-trivial everywhere
    assert all(g.abs().max() > 0 for g in ref["grads"].values())


def test_pipeline_parallel_2_matches_single_stage():
    (ref,) = run_distributed(_pp_run, 1, None)
    assert ref["layers"] == [list(range(1, 9))]                    # 4 decoder layers = 8 HybridStack layers
    first, last = run_distributed(_pp_run, 2, ref["weights"], pp=2)
    assert first["layers"] == [[1, 2, 3, 4]] and last["layers"] == [[5, 6, 7, 8]]
    assert first["losses"] == [] and len(last["losses"]) == 2
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-6)
    # The tied embedding lives on both stages; its gradient is the sum of the two copies' (finalize_model_grads).
    assert_same_grads(_merge_stage_grads([first, last]), ref["grads"])


def test_interleaved_virtual_pipeline_matches_single_stage():
    (ref,) = run_distributed(_pp_run, 1, None)
    first, last = run_distributed(_pp_run, 2, ref["weights"], 2, pp=2, vpp=2)
    assert first["layers"] == [[1, 2], [5, 6]] and last["layers"] == [[3, 4], [7, 8]]
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-6)
    assert_same_grads(_merge_stage_grads([first, last]), ref["grads"])
