"""megatron's SelfAttention with a static KV cache that holds rotated keys, laid out head by head.

megatron-core's static inference path (0.16.1, without flash decoding) stores each key before
rotary and, at every step, applies rotary to the whole cache again (cos, sin, the rotation and a
concatenation over every cached key of every layer), and keeps the cache as [entries, batch,
groups, dim], so that a single query reads each head's keys 16 KiB apart (batch 8, hidden 512)
instead of in one run. A cached decoding step of a LLaMA of 6 x 512 at batch 8 spent about 40%
of its time on the re-rotation, and its attention ran several times slower over the strided
cache than over a head-major one (docs/inference.md).

Here a new key is rotated once, by its own entry of the rotary table, when it enters the cache,
and only the queries are rotated at each step: the same elementwise arithmetic on every key, so
the keys attended over are the ones megatron would have rotated. The buffers are allocated
[batch, groups, entries, dim] and handed to megatron's code as views in its own index order
([entries, batch, groups, dim]), so everything that indexes the cache keeps working. Everything
else (training, no cache, flash decoding, dynamic batching) is megatron's own path.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import deprecate_inference_params


class CachedRotarySelfAttention(SelfAttention):
    """SelfAttention (same constructor, same parameters) whose static KV cache stores rotated keys."""

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos=None, rotary_pos_sin=None,
        rotary_pos_cos_sin=None, sequence_len_offset=None, *, inference_params=None,
    ):
        context = deprecate_inference_params(inference_context, inference_params)
        if context is None or not context.is_static_batching() or self.training or self.config.flash_decode:
            return super()._adjust_key_value_for_inference(
                context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                sequence_len_offset)
        memory = context.key_value_memory_dict.get(self.layer_number)
        if memory is None:
            memory = tuple(
                t.new_empty(context.max_batch_size, self.num_query_groups_per_partition, context.max_sequence_length,
                            dim).permute(2, 0, 1, 3)
                for t, dim in ((key, self.key_hidden_size), (value, self.val_hidden_size)))
            context.key_value_memory_dict[self.layer_number] = memory
        key_memory, value_memory = memory
        start, b0 = context.sequence_len_offset, context.batch_size_offset
        end, b1 = start + key.size(0), b0 + key.size(1)
        if end > key_memory.size(0) or b1 > key_memory.size(1):
            raise ValueError(f"KV cache of {key_memory.size(0)} entries x batch {key_memory.size(1)} is too small "
                             f"for entries [{start}, {end}) of batch [{b0}, {b1})")
        if rotary_pos_emb is not None:  # (query table, key table), indexed by cache entry as megatron's
            q_emb, k_emb = rotary_pos_emb
            if k_emb is not None:
                key = apply_rotary_pos_emb(key, k_emb[start:end], config=self.config,
                                           mscale=_yarn_get_concentration_factor_from_config(self.config),
                                           cp_group=self.pg_collection.cp)
            # The forward rotates the query by the first table and, the second being None, no key.
            rotary_pos_emb = (None if q_emb is None else q_emb[start:end], None)
        key_memory[start:end, b0:b1] = key
        value_memory[start:end, b0:b1] = value
        # As megatron: past the first fill, the attention gets no mask type of its own (only the mask given).
        mask_type = self.attn_mask_type if start == 0 else AttnMaskType.no_mask
        return query, key_memory[:end, b0:b1], value_memory[:end, b0:b1], rotary_pos_emb, mask_type, None
