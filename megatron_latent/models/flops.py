"""Exact FLOP counts of every method's forward, for MFU and for benchmark ratios.

Counted per pass at that pass's sequence length (latent growth passes are shorter, pause passes
(K+1) times longer), attention included (QK^T and AV over the full S x S score matrix, as the
kernels compute it), the output layer once per token (only at the output slot; a loop's last
pass). Interpolated thoughts add, for every thought fed, the output layer's matmul over its slot
and the softmax mix [slots, V] @ [V, H]; pondering with the softmax mix adds both over every
position after each of its first K forwards (its hidden feedback is an addition, not counted).
A matmul of [m, k] x [k, n] is 2mkn FLOPs; a training
step is 3x the forward (backward = 2x), except for passes run without a graph. Elementwise work
(norms, activations, softmax, exp) and embedding lookups are not counted.

A model is described by its ModelConfig: `model_step_flops(cfg, seq, J)` for training and
evaluation steps, `model_decode_flops(cfg, position)` for KV-cached decoding; `decoder_pass_flops`
is the count of one pass of the layer stack that both are built from. `model_decode_bytes` counts
the weights and cache a decode step reads, for the steps that memory rather than arithmetic bounds.
"""

from __future__ import annotations


def decoder_pass_flops(seq: int, hidden: int, num_layers: int, ffn_hidden: int, num_heads: int,
                       num_query_groups: int = None, gated_mlp: bool = False) -> int:
    """Forward FLOPs of one decoder pass over `seq` positions (batch 1)."""
    groups = num_query_groups or num_heads
    kv = 2 * hidden * groups // num_heads
    qkv = 2 * seq * hidden * (hidden + kv)
    attention = 2 * 2 * seq * seq * hidden
    proj = 2 * seq * hidden * hidden
    mlp = 2 * seq * hidden * ffn_hidden * (3 if gated_mlp else 2)
    return num_layers * (qkv + attention + proj + mlp)


def _pass_flops(cfg, seq: int) -> int:
    """`decoder_pass_flops` of the decoder `cfg` describes."""
    return decoder_pass_flops(seq, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size, cfg.num_attention_heads,
                              cfg.query_groups, cfg.gated)


def model_step_flops(cfg, seq: int, num_jacobi: int, training: bool = True) -> int:
    """FLOPs of one forward (+ backward when `training`) of the model a ModelConfig describes (its
    sizes and method) over one sequence of `seq` tokens, with `num_jacobi` Jacobi passes (latent
    thoughts only). With `latent.grad_passes` k only the last k passes are backpropagated."""
    latent = cfg.latent
    j = num_jacobi if latent.num_latent_thoughts else 0
    lengths = latent.pass_slots(j)
    no_grad = latent.passes_without_grad(j) if training else 0
    per_pass = [_pass_flops(cfg, k * seq) for k in lengths]
    output_layer = 2 * seq * cfg.hidden_size * cfg.padded_vocab_size  # also each matmul of one interpolated slot
    if not training:
        total = sum(per_pass) + output_layer
    else:
        total = sum(per_pass[:no_grad]) + 3 * (sum(per_pass[no_grad:]) + output_layer)
    if latent.num_ponder_steps and latent.mixes_embeddings:
        # K mixes over all positions: logits [seq, V] and the mix [seq, H], each with a backward.
        total += (3 if training else 1) * 2 * latent.num_ponder_steps * output_layer
    if latent.thought_input == "interpolated":
        n = latent.num_latent_thoughts
        for p, k in enumerate(lengths[:-1]):
            fed = min(k, n) * output_layer  # slots fed by pass p: logits [seq, V], then the mix [seq, H]
            if not training or p + 1 < no_grad:
                total += 2 * fed  # forward only: the next pass keeps no graph
            elif p + 1 == no_grad:
                # The next pass is the first with a graph, this one's hidden state a constant: backward
                # gives the output layer's and the embedding's weight gradients and the mix's input
                # gradient, not the hidden state's.
                total += 2 * fed + 3 * fed
            else:
                total += 3 * 2 * fed
    return total


def _slot_matmul_flops(cfg) -> int:
    """FLOPs of the layers' matmuls for one slot (no attention over other entries): two per weight."""
    return _pass_flops(cfg, 1) - cfg.num_layers * 2 * 2 * cfg.hidden_size


def _decode_counts(cfg, position: int):
    """(single-slot steps, cached entries attended summed over them, output-layer-sized matmuls) of
    KV-cached decoding of the token at `position`: what model_decode_flops and model_decode_bytes
    both count."""
    latent = cfg.latent
    if latent.num_extra_loops or latent.num_ponder_steps:
        passes = latent.num_extra_loops + latent.num_ponder_steps + 1
        mixes = 2 * latent.num_ponder_steps if latent.mixes_embeddings and latent.num_ponder_steps else 0
        return passes, passes * (position + 1), 1 + mixes
    slots = latent.num_slots
    mixes = 2 * latent.num_latent_thoughts if latent.thought_input == "interpolated" else 0
    return slots, sum(slots * position + k + 1 for k in range(slots)), 1 + mixes


def model_decode_flops(cfg, position: int) -> int:
    """Forward FLOPs of KV-cached decoding of the token at `position` (0-based: `position` tokens
    are in the cache) by the model a ModelConfig describes, the output layer once (only the output
    slot's logits are used):

    * latent thoughts and pause tokens: N+1 (K+1) single-slot steps (the token, then its thoughts
      or pauses), step k attending over the (N+1) x position cached entries and the k+1 of this
      position; interpolated thoughts add the output layer and the mix for each of the N thoughts
      fed. Summed over positions 0..S-1 it is the causal forward over the (N+1) S slots: the
      matmuls of every slot, attention over the lower triangle only;
    * extra loops and pondering: K+1 single-slot steps, one per pass, each with a cache of its
      own pass's entries (position + 1 attended): K+1 causal forwards over S when summed;
      pondering's softmax mix adds the output layer and the mix after each of the first K.
    """
    attend = cfg.num_layers * 2 * 2 * cfg.hidden_size  # attention of one query over one cached entry
    steps, entries, outputs = _decode_counts(cfg, position)
    return steps * _slot_matmul_flops(cfg) + attend * entries + outputs * 2 * cfg.hidden_size * cfg.padded_vocab_size


def model_decode_bytes(cfg, position: int, batch: int, bytes_per_value: int = 4) -> int:
    """Bytes of weights and KV cache one KV-cached decoding step of `batch` samples reads, the token
    at `position` (as model_decode_flops): every matmul weight once per single-slot step (shared by
    the batch), the output layer's per output-layer-sized matmul, and the keys and values of every
    cached entry each step attends over, per sample. Where a step is bound by memory rather than by
    arithmetic (small batches of a small model, or attention over a long cache on a CPU), its time
    follows this count. A latent token's N+1 steps read the layers' weights N+1 times, as the
    vanilla model of (N+1)x the layers does once, but each step reads a cache of (N+1)x the entries:
    the attention's share of the bytes is (N+1)x the equal-FLOP model's."""
    weights = _slot_matmul_flops(cfg) // 2
    kv_values = cfg.num_layers * 2 * cfg.hidden_size * cfg.query_groups // cfg.num_attention_heads
    steps, entries, outputs = _decode_counts(cfg, position)
    return bytes_per_value * (steps * weights + outputs * cfg.hidden_size * cfg.padded_vocab_size
                              + batch * entries * kv_values)
