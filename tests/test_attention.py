"""models.attention.FusedDotProductAttention equals megatron's DotProductAttention up to rounding:
outputs and input gradients, causal without a mask, explicit masks (document resets, the slot
mask of the latent model), grouped queries, one query over a cache; and falls back to megatron's
own forward where the fused call would differ (attention dropout while training)."""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_latent.config import ModelConfig
from megatron_latent.models import slots
from megatron_latent.models.attention import FusedDotProductAttention
from megatron_latent.models.transformer_config import to_transformer_config


def _pair(groups=4, attention_dropout=0.0):
    cfg = ModelConfig(name="t", arch="gpt-neox", num_layers=2, hidden_size=64, num_attention_heads=4,
                      num_query_groups=groups, ffn_hidden_size=256, vocab_size=256, seq_length=64,
                      attention_dropout=attention_dropout)
    tc = to_transformer_config(cfg, 1, 1)
    kw = dict(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kw), FusedDotProductAttention(**kw)


def _qkv(sq, sk, b=3, heads=4, groups=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, d, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(sk, b, groups, d, generator=g).requires_grad_()
    v = torch.randn(sk, b, groups, d, generator=g).requires_grad_()
    return q, k, v


def _check(ref, fused, q, k, v, mask):
    out_r = ref(q, k, v, mask)
    grads_r = torch.autograd.grad(out_r.square().sum(), (q, k, v))
    out_f = fused(q, k, v, mask)
    grads_f = torch.autograd.grad(out_f.square().sum(), (q, k, v))
    assert out_f.shape == out_r.shape
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_causal_without_mask(single_rank):
    ref, fused = _pair()
    _check(ref, fused, *_qkv(24, 24), None)


def test_document_reset_and_slot_masks(single_rank):
    ref, fused = _pair()
    L = 12
    causal = slots.causal_mask(L).expand(3, 1, L, L).clone()
    causal[1, :, 6:, :6] = True  # sample 1: a new document at position 6
    mask = slots.slot_attention_mask(causal, 2)
    _check(ref, fused, *_qkv(2 * L, 2 * L), mask)


def test_grouped_queries(single_rank):
    ref, fused = _pair(groups=2)
    _check(ref, fused, *_qkv(20, 20, groups=2), None)


def test_one_query_over_cached_keys(single_rank):
    ref, fused = _pair()
    _check(ref, fused, *_qkv(1, 9), None)


def test_dropout_while_training_is_megatrons(single_rank):
    ref, fused = _pair(attention_dropout=0.5)
    q, k, v = _qkv(16, 16)
    assert not fused._fused_ok(q, k, None, None, None)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    out_r = ref(q, k, v, None)
    tracker.set_states(states)
    torch.testing.assert_close(fused(q, k, v, None), out_r, rtol=0, atol=0)
    fused.eval()
    assert fused._fused_ok(q, k, None, None, None)


@pytest.mark.parametrize("sq", [1, 8])
def test_mask_type_none_is_not_causal(single_rank, sq):
    # A query shorter than the keys with a mask: both attend where the mask allows.
    ref, fused = _pair()
    q, k, v = _qkv(sq, 8)
    mask = torch.zeros(1, 1, sq, 8, dtype=torch.bool)
    mask[..., -1] = True
    _check(ref, fused, q, k, v, mask)
