"""The token embedding's lookup that adds its weight gradient into main_grad (model/embedding.py), on CPU.

The lookup alone: it equals F.embedding (zero rows where masked), two micro-batches' gradients added into an fp32
main_grad equal the float64 dense gradient (repeated ids, masked tokens left out; fp32 and bf16 weights, relative
1e-6), and backward hands autograd megatron's stand-in for the weight, or nothing for a weight marked
`zero_out_wgrad` or with give_grad False. On megatron's embedding module at TP = 1, TP = 2 and TP = 2 with sequence
parallelism (gloo ranks): the output equals `model.embedding(...)` exactly and each rank's main_grad the float64
dense gradient of its vocabulary rows. The whole model's main_grad after a training step, against megatron's lookup
and hook, is tests/training/test_wgrad_accumulation.py's."""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from model_parallel_utils import BATCH, SEQ, small_cfg, tp_model_with

from transxssm_megatron.model.embedding import embed_into_main_grad, lookup_into_main_grad, reproduces_megatron


def _dense_grad(ids: torch.Tensor, grad: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 reference: d(sum grad * weight[ids]) / d weight = onehot(ids)^T @ grad, (vocab, d)."""
    return F.one_hot(ids.reshape(-1), vocab).double().t() @ grad.reshape(-1, grad.shape[-1]).double()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("masked", [False, True], ids=["all-ids-local", "some-ids-on-other-ranks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_adds_its_gradient_into_main_grad(dtype, masked):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(50, 16, generator=g).to(dtype))
    main_grad = torch.randn(50, 16, generator=g)                    # fp32, as megatron's buffer
    expected = main_grad.double()
    for _ in range(2):                                              # two micro-batches into one buffer
        ids = torch.randint(0, 12, (7, 3), generator=g)             # 21 tokens over 12 rows: many repeats
        outside = torch.rand(ids.shape, generator=g) < 0.3 if masked else None
        out = lookup_into_main_grad(ids, weight, main_grad, outside=outside)
        reference = F.embedding(ids, weight)
        if masked:
            assert outside.any() and (~outside).any()
            reference = reference.masked_fill(outside[..., None], 0.0)
        assert torch.equal(out, reference)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        out.backward(grad)
        expected += _dense_grad(ids, grad if outside is None else grad.masked_fill(outside[..., None], 0.0), 50)
    err = _relative_error(main_grad, expected)
    assert err < 1e-6, err       # a bf16 sum of the rows would be ~1e-3 off


@pytest.mark.parametrize("zero_out_wgrad, give_grad", [(False, True), (True, True), (False, False)],
                         ids=["own-weight", "marked-zero-out-wgrad", "give-grad-false"])
def test_what_backward_returns_for_the_weight(zero_out_wgrad, give_grad):
    """megatron's contract (main_grad.weight_grad_stand_in): a stand-in marked as already added, so that the DDP hook
    runs and adds nothing; nothing for a weight megatron marks zero_out_wgrad; nothing with give_grad False. The
    gradient goes into main_grad in every case."""
    weight = torch.nn.Parameter(torch.randn(10, 4))
    weight.grad_added_to_main_grad = False                          # as megatron's DDP sets it up
    if zero_out_wgrad:
        weight.zero_out_wgrad = True
    main_grad = torch.zeros(10, 4)
    lookup_into_main_grad(torch.tensor([[1, 3], [3, 7]]), weight, main_grad, give_grad).sum().backward()
    assert main_grad[[1, 3, 7]].eq(torch.tensor([1.0, 2.0, 1.0])[:, None]).all() and main_grad.sum() == 16
    if give_grad and not zero_out_wgrad:
        assert weight.grad is not None and weight.grad.shape == weight.shape and weight.grad_added_to_main_grad
    else:
        assert weight.grad is None and not weight.grad_added_to_main_grad


def test_main_grad_of_another_shape_is_refused():
    weight = torch.nn.Parameter(torch.randn(50, 16))
    with pytest.raises(ValueError, match=r"main_grad must have the embedding's shape \(50, 16\)"):
        lookup_into_main_grad(torch.zeros(2, 2, dtype=torch.long), weight, torch.zeros(16, 50))


def _against_megatron_embedding(sequence_parallel: bool) -> None:
    """In a gloo rank: megatron's embedding module of the small model against embed_into_main_grad on it."""
    from megatron.core import parallel_state

    cfg = small_cfg("transxssm")
    model, _ = tp_model_with(cfg, None, sequence_parallel)
    emb, words = model.embedding, model.embedding.word_embeddings
    assert reproduces_megatron(emb)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    vocab, local = cfg.padded_vocab_size, words.weight.shape[0]
    g = torch.Generator().manual_seed(3)                            # the same batch on every rank of the TP group
    # Few distinct ids (many repeats), among them the first and last rows of every rank's vocabulary range.
    edges = [0, local - 1, min(local, vocab - 1), vocab - 1]
    pool = torch.cat([torch.tensor(edges), torch.randint(0, vocab, (8,), generator=g)])
    main_grad = torch.randn(words.weight.shape, generator=g)
    expected = main_grad.double()
    for _ in range(2):
        ids = pool[torch.randint(0, len(pool), (BATCH, SEQ), generator=g)]
        ours = embed_into_main_grad(emb, ids, main_grad)
        assert torch.equal(ours, emb(input_ids=ids, position_ids=None))
        whole = torch.randn((SEQ, BATCH, cfg.hidden_size), generator=g)   # d loss / d the (l, b, d) embedding
        ours.backward(whole.chunk(tp)[rank] if sequence_parallel else whole)
        expected += _dense_grad(ids.t(), whole, vocab)[words.vocab_start_index:words.vocab_end_index]
    assert expected.abs().sum(1).gt(0).any()
    err = _relative_error(main_grad, expected)
    assert err < 1e-6, f"rank {rank}: relative error {err:.2e}"
    # One stage holds the LM head too: megatron marks the shared weight, and the lookup hands autograd nothing.
    assert words.weight.zero_out_wgrad and words.weight.grad is None


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-sequence-parallel"])
def test_model_embedding_matches_megatron(tp, sequence_parallel):
    run_distributed(_against_megatron_embedding, tp, sequence_parallel, tp=tp)
