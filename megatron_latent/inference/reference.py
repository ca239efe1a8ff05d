"""The exact sequential rollout of every method: the ground truth the parallel forward must reach.

Latent and interpolated thoughts: for each position t, feed the token, then N thoughts (the last
post-norm hidden state, or its softmax mix of the embeddings: `model.thought_input`) all at
position t; the logits come from slot N. Pause tokens: the token, then the pause embedding K
times at position t (nothing is fed back); the logits come from slot K. Here every step reruns
the decoder over the whole prefix (no cache): slow, and correct by construction, which is what a
reference is for. Extra loops: the whole decoder over the tokens, then K more times over its own
output before the final norm, which only the last application applies; pondering: K+1 whole
forwards, each feeding the next (causal, so one pass over the prefix is the token-by-token
rollout).
"""

from __future__ import annotations

import torch

from megatron_latent.models import slots


@torch.no_grad()
def sequential_hidden_states(model, input_ids, position_ids, attention_mask=None):
    """Post-norm hidden states [L, b, h] at the output slot of every position, decoded one slot
    at a time (extra loops: one whole-prefix application of the layer stack per loop)."""
    lat = model.latent
    tokens, pos = model.token_inputs(input_ids, position_ids)
    if lat.num_extra_loops:
        x, loops = tokens, lat.num_extra_loops + 1
        for p in range(loops):
            x = model.decode(x, 1, attention_mask, position_ids, final_norm=p == loops - 1)
        return x
    if lat.num_ponder_steps:
        x = tokens
        for _ in range(lat.num_ponder_steps):
            x = model.ponder_input(tokens, x, model.decode(x, 1, attention_mask, position_ids))
        return model.decode(x, 1, attention_mask, position_ids)
    num_slots = lat.num_slots
    # Inputs that do not depend on earlier slots: the tokens, and with pause tokens the K pauses.
    given = model.first_columns(tokens, pos)
    mask = slots.slot_attention_mask(attention_mask, num_slots)
    rotary = model.rotary_for(position_ids, num_slots)
    inputs, outputs = [], []
    for t in range(tokens.shape[0]):
        inputs.append(given[0][t])
        for a in range(num_slots):
            s = len(inputs)
            h = model.decoder(
                hidden_states=torch.stack(inputs),
                attention_mask=None if mask is None else mask[..., :s, :s],
                rotary_pos_emb=None if rotary is None else rotary[:s],
            )[-1]
            if a + 1 < len(given):
                inputs.append(given[a + 1][t])
            elif a < num_slots - 1:
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
