"""KV-cached decoding of a LatentGPTModel (every method) on megatron-core's static inference context.

Per token: one token step, then N thought steps at the same position id, each feeding the last
post-norm hidden state (or, interpolated, its softmax mix of the embeddings: `thought_input`) back
as the next input (plus the learned position embedding for GPT-2), so every token leaves N+1
entries in the cache. Pause tokens: the token step, then K steps of the pause embedding at the
same position id (K+1 entries per token, the prediction from the last). Extra loops: each of the
K+1 applications of the layer stack attends over its own keys and values, so each loop has its
own cache: K+1 StaticInferenceContexts advanced together (one entry per token in each); so has
each of the K+1 forwards of pondering, whose next input is fed position by position (the model's
`next_columns`), so a token's forwards run one after another through their caches. Separate
contexts rather than one with layer numbers offset per loop: megatron keys its cache by the
layers' own `layer_number`, which the shared layers cannot change per call. The cache is megatron-core's own
`StaticInferenceContext`, passed through the decoder as `inference_context`: each attention layer
appends its keys/values and attends over all of them.

Two things megatron's static path does not know about, handled here:

* Slots share position ids, so rotary must be indexed by each cache entry's *position id*, not by
  its cache index. megatron's attention reads the table it is given by cache index (queries
  `rotary[start:end]`, keys `rotary[:end]`), so we hand the decoder a rotary table indexed by
  cache entry (LatentGPTModel.rotary_for of each entry's position id, written once when the
  entry is added, like the padding mask: a step builds neither anew). The project's attention
  (models.cached_attention) rotates each key once, when it enters the cache; megatron-core's own
  would re-rotate every cached key at every step.
* Left padding: an explicit mask [b, 1, new, cached] hides padded entries and keeps the new entries
  causal among themselves (megatron's local attention ignores the no-mask hint it switches to
  after the first step, and asserts square masks when none is given).

The prompt's thoughts are solved by the model's own pass loop (`solve_thoughts`, the training
forward's growth and Jacobi passes), and each decoded thought is fed back by its `thought_input`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_latent.inference.params import PrefillParams
from megatron_latent.models import slots
from megatron_latent.models.latent import without_final_norm


class LatentKVDecoder:
    """The KV cache of one batch and the steps that grow it.

    `max_positions` token positions (prompt + new tokens) of `batch_size` samples are reserved:
    (N+1) * max_positions cache entries per layer (K+1 with pause tokens; with extra loops
    max_positions per layer and loop).
    """

    def __init__(self, model, batch_size: int, max_positions: int):
        self.model = model
        lat = model.latent
        self.n = lat.num_latent_thoughts
        self.num_slots = lat.num_slots
        self.output_slot = lat.output_slot
        self.capacity = max_positions * self.num_slots
        passes = lat.num_extra_loops + lat.num_ponder_steps + 1
        self.contexts = [StaticInferenceContext(batch_size, self.capacity) for _ in range(passes)]
        device = model.embedding.word_embeddings.weight.device
        # Per cache entry, written once when the entry is added and read as views afterwards: the
        # padding mask [b, 1, 1, entries] (True = masked out) and the rotary table of its position id.
        self.slot_masked = torch.ones(batch_size, 1, 1, self.capacity, dtype=torch.bool, device=device)
        self.slot_rotary = None

    @property
    def length(self) -> int:
        """Cache entries filled so far."""
        return self.contexts[0].sequence_len_offset

    # ------------------------------------------------------------------------------------ core
    def forward_slots(self, inputs, positions, valid):
        """Append slots `inputs` [s, b, h] (position ids [b, s], valid [b, s]) to the cache, attend
        over the whole cache, and return their post-norm hidden states [s, b, h]."""
        s = inputs.shape[0]
        start, end = self.length, self.length + s
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} entries needed, {self.capacity} reserved")
        self.slot_masked[:, 0, 0, start:end] = ~valid
        mask = self.slot_masked[..., :end]  # True = masked out
        if start == 0 and s > 1 and bool(valid.all()):
            mask = None  # a first fill without padding is plain causal: the attention's causal kernel
        elif s > 1:  # new entries are causal among themselves (a single one sees all it may)
            mask = mask | torch.ones(s, end, dtype=torch.bool, device=inputs.device).triu(start + 1)
        rotary = self.model.rotary_for(positions, 1)  # [s, b, 1, d] or None
        if rotary is not None:
            if self.slot_rotary is None:
                self.slot_rotary = rotary.new_zeros(self.capacity, *rotary.shape[1:])
            self.slot_rotary[start:end] = rotary
            rotary = self.slot_rotary[:end]
        model, x, passes = self.model, inputs, len(self.contexts)
        for p, context in enumerate(self.contexts):  # extra loops: the final norm after the last only
            final_norm = model.final_norm_on_pass(p, passes)
            with contextlib.nullcontext() if final_norm else without_final_norm(model.decoder):
                h = model.decoder(hidden_states=x, attention_mask=mask, rotary_pos_emb=rotary,
                                  inference_context=context)
            if p + 1 < passes:  # a loop's residual stream, or pondering's feedback
                x = model.next_columns(inputs, None, h, 1, [x])[0]
        for context in self.contexts:
            context.sequence_len_offset = end
        return h

    def step(self, input_ids, position_ids, valid):
        """One token per sample ([b, 1] ids and positions, [b, 1] valid): the token step then N thought
        steps (K pause steps) at the same position. Returns the hidden state of the last [1, b, h]."""
        model = self.model
        x, pos = model.token_inputs(input_ids, position_ids)
        given = model.first_columns(x, pos)  # the token, and the K pauses
        for a in range(self.num_slots):
            h = self.forward_slots(x, position_ids, valid)
            if a + 1 < self.num_slots:
                x = given[a + 1] if a + 1 < len(given) else model.thought_input(h, pos)
        return h

    def fill(self, columns, position_ids, valid):
        """Append whole positions at once: `columns` [tokens, thought 1..N] (or [tokens, K pauses];
        [L, b, h] each) are interleaved into (N+1) L cache entries. Returns hidden [(N+1) L, b, h]."""
        k = len(columns)
        return self.forward_slots(
            slots.interleave(columns),
            slots.slot_position_ids(position_ids, k),
            valid.repeat_interleave(k, dim=1),
        )

    # --------------------------------------------------------------------------------- prefill
    def prefill(self, input_ids, position_ids, valid,
                params: PrefillParams = PrefillParams()) -> Tuple[torch.Tensor, Optional[int]]:
        """Put a prompt [b, P] into the cache; returns (hidden at the output slot of every position [P, b, h],
        Jacobi passes used or None).

        Modes (`params.mode`):
        exact       slot by slot, the prompt's thoughts exactly as in the sequential reference;
        jacobi      growth + `jacobi_iters` Jacobi passes of the training forward (default: the
                    model's jacobi_iters_eval), then one pass over the interleaved prompt fills
                    the cache (that pass is the forward's final pass);
        tolerance   Jacobi passes until no thought moves by more than `tol` (max abs change over
                    the real, unpadded positions), at most `max_jacobi_iters` (default P * N,
                    enough for the causal Jacobi map to reach its fixed point). The same rule
                    and names as the exported model's `latent_prefill="tolerance"`.
        With N = 0 there are no thoughts: every mode is one pass over the prompt (pause tokens:
        over the tokens and their pauses; extra loops: K+1 applications of the layers, each
        filling its own cache).
        """
        if self.length:
            raise ValueError("prefill needs an empty cache")
        n = self.n
        if params.mode == "exact" and n > 0:
            return torch.cat([self.step(input_ids[:, t:t + 1], position_ids[:, t:t + 1], valid[:, t:t + 1])
                              for t in range(input_ids.shape[1])]), None
        model = self.model
        tokens, pos = model.token_inputs(input_ids, position_ids)
        if n == 0:
            h = self.fill(model.first_columns(tokens, pos), position_ids, valid)
            return slots.take_slot(h, self.output_slot, self.num_slots), None
        converged = None
        if params.mode == "jacobi":
            budget = model.latent.jacobi_iters_eval if params.jacobi_iters is None else params.jacobi_iters
        else:  # tolerance: the causal Jacobi map reaches its fixed point within P * N passes
            budget = input_ids.shape[1] * n if params.max_jacobi_iters is None else params.max_jacobi_iters
            real = valid.t()[:, :, None]  # [P, b, 1]: padded positions do not count

            def converged(before, after):
                change = max(((a - b).abs() * real).max().item() for a, b in zip(after[1:], before[1:]))
                return change <= params.tol

        # The forward's growth and Jacobi passes; the pass that fills the cache is its final pass.
        columns, iters = model.solve_thoughts(tokens, pos, position_ids, _token_mask(valid), budget, converged)
        h = self.fill(columns, position_ids, valid)
        return slots.take_slot(h, self.output_slot, self.num_slots), iters


def _token_mask(valid):
    """Token-level mask [b, 1, P, P] (True = masked): causal, padded keys hidden; None if no padding."""
    if bool(valid.all()):
        return None
    p = valid.shape[1]
    return slots.causal_mask(p, valid.device) | ~valid[:, None, None, :]
