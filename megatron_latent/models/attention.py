"""megatron's local DotProductAttention, computed by torch's fused scaled_dot_product_attention.

The local path materialises the [b*heads, S, S] score matrix (baddbmm), masks and softmaxes it in
separate kernels and keeps the probabilities for the backward; torch's fused kernel (flash
attention on CPU, and on GPUs without Transformer Engine) does the same arithmetic tiled, skips
the masked-out upper triangle of a causal mask and keeps only a log-sum-exp per row. The latent
model runs attention over (N+1)-times longer sequences, so this was its largest single cost (about
a third of a latent training step at the size of benchmarks/bench_reference.py; docs/benchmarks.md).

The result is megatron's up to rounding (checked in tests/test_attention.py). Configurations the
fused call does not express the same way fall back to megatron's forward: attention dropout while
training (the fused call draws its own mask), query-key layer scaling, a softmax offset, sliding
windows, fp16/bf16 scores with fp32 softmax, and packed sequences or an attention bias.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class FusedDotProductAttention(DotProductAttention):
    """DotProductAttention (same constructor, same parameters: none) over F.scaled_dot_product_attention."""

    def _fused_ok(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        c = self.config
        if attention_bias is not None or packed_seq_params is not None:
            return False
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            return False
        if c.apply_query_key_layer_scaling or c.fp16 or c.bf16:
            return False
        if self.training and self.attention_dropout.p > 0:
            return False
        # megatron's causal mask (built when none is given) is square; a query shorter than the keys
        # with no mask (sq > 1) is refused there, and sq = 1 attends to every key.
        return attention_mask is not None or query.size(0) in (1, key.size(0))

    def forward(
        self,
        query,
        key,
        value,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if not self._fused_ok(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # megatron reads the mask type from the module, not from the call.
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and query.size(0) > 1
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # A single query (a cached decoding step) lets the kernel read each key/value head for its
        # query heads in place, rather than copying the whole cache per head group.
        gqa = groups > 1 and query.size(0) == 1
        if groups > 1 and not gqa:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, heads, d] -> [b, heads, s, d], made contiguous: the kernel walks keys and values row
        # by row, and in megatron's layout consecutive rows lie b * heads * d elements apart (8 KiB at
        # the bench_reference size); the copies cost less than they save (docs/benchmarks.md). Not
        # for one query (a cached decoding step): each key is read once, a copy would read it twice.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if query.size(0) > 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        context = F.scaled_dot_product_attention(
            q, k, v,
            # megatron's masks say True = masked out; torch's boolean masks say True = attend.
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa,
        )
        # [b, heads, s, d] -> [s, b, heads * d]
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
