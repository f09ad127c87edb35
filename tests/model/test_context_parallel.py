"""Context parallelism changes nothing: each CP rank feeds its contiguous block of the sequence, and the per-token
losses (gathered over CP), the masked loss sum (summed over CP) and every gradient (summed over CP, as the
data-parallel x context-parallel gradient reduction does) equal one process's on the whole sequence, from the same
weights (gloo ranks on CPU, fp32).

Tolerance: fp32 throughout; the parallel runs add the same terms in another order (the all-to-alls move data
exactly; the reductions over ranks and the split LM-head sums do not), so losses within 2e-5 absolute / 1e-5
relative and gradients within 2e-6 absolute / 1e-4 relative, as the TP tests (test_parallel_equivalence.py).
"""

import pytest
import torch
from distributed import run_distributed
from model_parallel_utils import BATCH, SEQ, batch, full_grads, load_full_weights, small_cfg
from test_parallel_equivalence import assert_same_grads

FOUR_HEADS = dict(num_attention_heads=4, ss_groups=4, num_query_groups=4)
CASES = {
    # name: (architecture, model overrides, sequence_parallel, fused)
    "transxssm": ("transxssm", {}, False, True),
    "transxssm-reference": ("transxssm", {}, False, False),     # train.fused=false: megatron's LM head + CE
    "mamba2": ("mamba2", {}, False, True),                       # causal conv1d, D, z gate, dt_bias
    "transformer": ("transformer", {}, False, True),
    "jamba-4heads-G2-gqa": ("jamba", dict(num_attention_heads=4, ss_groups=2, num_query_groups=2), False, True),
    "transxssm-4heads": ("transxssm", FOUR_HEADS, False, True),
    "mamba2-4heads": ("mamba2", FOUR_HEADS, False, True),
    "transxssm-4heads-sequence-parallel": ("transxssm", FOUR_HEADS, True, True),
}


def _loss_mask():
    g = torch.Generator().manual_seed(11)
    return (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()  # some tokens masked, unevenly over the CP blocks


def _run(case, full_weights):
    """Per-token loss, masked loss sum, logits (this rank's block) and gradients summed over CP, TP-gathered."""
    from megatron.core import parallel_state

    from transxssm_megatron.model import build_model, build_transformer_config
    from transxssm_megatron.model.fused_ops import set_fusion

    architecture, overrides, sequence_parallel, fused = CASES[case]
    set_fusion(fused)
    cfg = small_cfg(architecture, **overrides)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp_group = parallel_state.get_context_parallel_group()
    cp, cp_rank = cp_group.size(), cp_group.rank()
    model = build_model(cfg, build_transformer_config(cfg, tp=tp, cp=cp, sequence_parallel=sequence_parallel))
    if full_weights is None:
        full_weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        load_full_weights(model, full_weights)

    ids, labels = batch()
    block = slice(cp_rank * SEQ // cp, (cp_rank + 1) * SEQ // cp)       # this CP rank's contiguous positions
    ids, labels, mask = ids[0][:, block], labels[0][:, block], _loss_mask()[:, block]
    with torch.no_grad():
        logits = model(ids, None, runtime_gather_output=True)
        per_token = model(ids, None, labels=labels)
    loss_sum = model(ids, None, labels=labels, loss_mask=mask)
    (loss_sum / _loss_mask().sum()).backward()                          # the whole batch's token mean
    for p in model.parameters():                                        # DDP's sum over the CP ranks
        torch.distributed.all_reduce(p.grad, group=cp_group)
    set_fusion(True)
    return dict(logits=logits, per_token=per_token, loss_sum=loss_sum.detach(), grads=full_grads(model),
                weights=full_weights, cp_rank=cp_rank)


def _check(case, world_size, tp, cp):
    (ref,) = run_distributed(_run, 1, case, None)
    results = run_distributed(_run, world_size, case, ref["weights"], tp=tp, cp=cp)
    block = SEQ // cp
    for got in results:
        r = got["cp_rank"]
        want = slice(r * block, (r + 1) * block)
        torch.testing.assert_close(got["logits"], ref["logits"][:, want], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["per_token"], ref["per_token"][:, want], atol=2e-5, rtol=1e-5)
        assert_same_grads(got["grads"], ref["grads"])
    # the CP ranks' masked loss sums add up to the whole sequence's (the loss report)
    total = sum(got["loss_sum"] for got in results if got["cp_rank"] >= 0) / (world_size // cp)
    torch.testing.assert_close(total, ref["loss_sum"], atol=2e-5, rtol=1e-5)
    assert all(g.abs().max() > 0 for g in ref["grads"].values())       # not vacuous


@pytest.mark.parametrize("case", ["transxssm", "transxssm-reference", "mamba2", "transformer",
                                  "jamba-4heads-G2-gqa"])
def test_context_parallel_2_matches_single_process(case):
    _check(case, 2, tp=1, cp=2)


@pytest.mark.parametrize("case", ["transxssm-4heads", "mamba2-4heads", "transxssm-4heads-sequence-parallel"])
def test_tensor_2_by_context_parallel_2_matches_single_process(case):
    """4 gloo ranks: 3-15 s each on 2 cores."""
    _check(case, 4, tp=2, cp=2)


def test_context_parallel_rejects_groups_it_cannot_split():
    from transxssm_megatron.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=r"^ss_groups: G = 2 is not divisible by tp \* cp = 2 \* 2"):
        ModelConfig.from_preset("tiny", num_attention_heads=4, ss_groups=2).validate(tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"^num_attention_heads: 2 heads are not divisible by tp \* cp = 1 \* 4"):
        ModelConfig.from_preset("tiny").validate(cp=4)
    with pytest.raises(ConfigError, match=r"^num_query_groups:"):
        ModelConfig.from_preset("tiny", architecture="transformer", num_attention_heads=4,
                                num_query_groups=2).validate(cp=4)
    ModelConfig.from_preset("tiny").validate(cp=2)
