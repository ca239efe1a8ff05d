"""models.linear at one tensor-parallel rank equals megatron's Column/RowParallelLinear up to
rounding: output with the bias (handed back by megatron when skip_bias_add, added here), and the
gradients of input, weight and bias; with sequence parallelism configured it is megatron's own
path. (At TP=2 the layers are megatron's: tests/test_latent_parallel and test_parallel_core check
the whole model against its single-rank self.)"""

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_latent.config import ModelConfig
from megatron_latent.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear
from megatron_latent.models.parallel_residual import PartialSumRowParallelLinear
from megatron_latent.models.transformer_config import to_transformer_config


def _config(**overrides):
    cfg = ModelConfig(name="t", arch="gpt-neox", num_layers=2, hidden_size=32, num_attention_heads=4,
                      ffn_hidden_size=64, vocab_size=64, seq_length=16)
    return to_transformer_config(cfg, 1, 1, **overrides)


def _pair(megatron_cls, ours_cls, skip_bias_add, **overrides):
    tc = _config(**overrides)
    kw = dict(config=tc, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=skip_bias_add)
    if megatron_cls is ColumnParallelLinear:
        kw["gather_output"] = False
    else:
        kw["input_is_parallel"] = True
    torch.manual_seed(0)
    ref = megatron_cls(32, 48, **kw)
    ours = ours_cls(32, 48, **kw)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ref.bias.normal_()
        ours.bias.copy_(ref.bias)
    return ref, ours


def _run(linear, x):
    out, bias = linear(x)
    full = out if bias is None else out + bias
    grads = torch.autograd.grad(full.square().sum(), (x, linear.weight, linear.bias))
    return full, grads


_COLUMN = (ColumnParallelLinear, LocalColumnParallelLinear)
_ROW = (RowParallelLinear, LocalRowParallelLinear)
_PARTIAL = (RowParallelLinear, PartialSumRowParallelLinear)  # always hands its bias back


@pytest.mark.parametrize("classes,skip_bias_add",
                         [(_COLUMN, False), (_COLUMN, True), (_ROW, False), (_ROW, True), (_PARTIAL, True)],
                         ids=["column", "column-skip-bias-add", "row", "row-skip-bias-add", "partial-sum-row"])
def test_single_rank_is_megatrons_linear(single_rank, classes, skip_bias_add):
    ref, ours = _pair(*classes, skip_bias_add=skip_bias_add)
    assert ours.single_rank
    x = torch.randn(5, 3, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out_r, grads_r = _run(ref, x)
    out_o, grads_o = _run(ours, x)
    assert ours(x)[1] is None  # the bias is in the product
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_o, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_megatrons_path_where_it_cannot_fuse(single_rank):
    # megatron's fused bias-activation needs the bias handed back.
    _, ours = _pair(ColumnParallelLinear, LocalColumnParallelLinear, skip_bias_add=True,
                    bias_activation_fusion=True)
    assert not ours.single_rank
    x = torch.randn(5, 3, 32)
    assert ours(x)[1] is ours.bias
