"""The test harness itself: gloo ranks start, megatron's TP layers run on CPU, failures carry the traceback."""

import pytest
import torch
from distributed import run_distributed


def _tp_column_linear():
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                            tensor_model_parallel_size=2)
    layer = tensor_parallel.ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_,
                                                 bias=False, gather_output=True)
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    y, _ = layer(x)
    return parallel_state.get_tensor_model_parallel_rank(), layer.weight.detach().clone(), y.detach()


def _fails_on_rank1():
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom from rank 1")
    torch.distributed.barrier()


def test_tp2_column_parallel_linear_gathers_full_output():
    (r0, w0, y0), (r1, w1, y1) = run_distributed(_tp_column_linear, 2, tp=2)
    assert (r0, r1) == (0, 1)
    full_w = torch.cat([w0, w1])                    # the two shards are the rows of one (6, 8) weight
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(y0, x @ full_w.T)
    torch.testing.assert_close(y1, y0)


def test_rank_exception_propagates_with_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*boom from rank 1"):
        run_distributed(_fails_on_rank1, 2, timeout_s=60)
