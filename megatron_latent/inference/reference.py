"""The exact sequential latent rollout: the ground truth the parallel (Jacobi) forward must reach.

For each position t, feed the token, then feed the last post-norm hidden state back N times, all
at position t; the logits come from slot N. Here every step reruns the decoder over the whole
prefix (no cache): slow, and correct by construction, which is what a reference is for.
"""

from __future__ import annotations

import torch

from megatron_latent.models import slots


@torch.no_grad()
def sequential_hidden_states(model, input_ids, position_ids, attention_mask=None):
    """Post-norm hidden states [L, b, h] at slot N of every position, decoded one slot at a time."""
    n = model.latent.num_latent_thoughts
    num_slots = n + 1
    tokens, pos = model.token_inputs(input_ids, position_ids)
    mask = slots.slot_attention_mask(attention_mask, num_slots)
    rotary = model.rotary_for(position_ids, num_slots)
    inputs, outputs = [], []
    for t in range(tokens.shape[0]):
        inputs.append(tokens[t])
        for a in range(num_slots):
            s = len(inputs)
            h = model.decoder(
                hidden_states=torch.stack(inputs),
                attention_mask=None if mask is None else mask[..., :s, :s],
                rotary_pos_emb=None if rotary is None else rotary[:s],
            )[-1]
            if a < n:
                inputs.append(model.thought_input(h, None if pos is None else pos[t]))
            else:
                outputs.append(h)
    return torch.stack(outputs)


@torch.no_grad()
def sequential_logits(model, input_ids, position_ids, attention_mask=None):
    """Logits [b, L, vocab] (gathered over tensor-parallel ranks) of the exact rollout."""
    if model.config.sequence_parallel:
        raise ValueError("the sequential reference runs without sequence parallelism")
    hidden = sequential_hidden_states(model, input_ids, position_ids, attention_mask)
    return model.output(hidden, input_ids, position_ids, runtime_gather_output=True)
