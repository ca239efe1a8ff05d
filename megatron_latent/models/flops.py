"""Exact FLOP counts of the latent forward, for MFU and for benchmark ratios.

Counted per pass at that pass's sequence length (the growth passes are shorter), attention
included (QK^T and AV over the full S x S score matrix, as the kernels compute it), the output
layer once per token (only at the last-thought slot). A matmul of [m, k] x [k, n] is 2mkn FLOPs;
a training step is 3x the forward (backward = 2x).
"""

from __future__ import annotations

from megatron_latent.config import LatentSettings


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


def latent_step_flops(seq: int, num_latent_thoughts: int, num_jacobi: int, vocab: int, hidden: int,
                      num_layers: int, ffn_hidden: int, num_heads: int, num_query_groups: int = None,
                      gated_mlp: bool = False, training: bool = True, grad_passes: int = None) -> int:
    """FLOPs of one forward (+ backward when `training`) over one sequence of `seq` tokens.
    `grad_passes` k: only the last k passes are backpropagated (the others count as forward only)."""
    settings = LatentSettings(num_latent_thoughts, grad_passes=grad_passes)
    lengths = settings.pass_slots(num_jacobi)
    without_grad = settings.passes_without_grad(num_jacobi) if training else 0
    per_pass = [decoder_pass_flops(k * seq, hidden, num_layers, ffn_hidden, num_heads, num_query_groups, gated_mlp)
                for k in lengths]
    output_layer = 2 * seq * hidden * vocab
    if not training:
        return sum(per_pass) + output_layer
    return sum(per_pass[:without_grad]) + 3 * (sum(per_pass[without_grad:]) + output_layer)


def model_step_flops(cfg, seq: int, num_jacobi: int, training: bool = True) -> int:
    """`latent_step_flops` of a ModelConfig (its sizes, N and grad_passes) over one sequence."""
    lat = cfg.latent
    return latent_step_flops(seq, lat.num_latent_thoughts, num_jacobi if lat.num_latent_thoughts else 0,
                             cfg.padded_vocab_size, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size,
                             cfg.num_attention_heads, cfg.query_groups, cfg.gated, training, lat.grad_passes)


def latent_decode_flops(position: int, num_latent_thoughts: int, vocab: int, hidden: int, num_layers: int,
                        ffn_hidden: int, num_heads: int, num_query_groups: int = None,
                        gated_mlp: bool = False) -> int:
    """Forward FLOPs of KV-cached decoding of the token at `position` (0-based: `position` tokens
    are in the cache): N+1 single-slot steps (the token, then its N thoughts), step k attending over
    the (N+1) x position cached entries and the k+1 of this position; the output layer once (only
    the last thought's logits are used). Summed over positions 0..S-1 it is the causal forward over
    the (N+1) S slots: the matmuls of every slot, attention over the lower triangle only."""
    slots = num_latent_thoughts + 1
    one_slot = decoder_pass_flops(1, hidden, num_layers, ffn_hidden, num_heads, num_query_groups, gated_mlp)
    one_slot -= num_layers * 2 * 2 * hidden  # decoder_pass_flops(1) attends over 1 entry: counted below
    entries = sum(slots * position + k + 1 for k in range(slots))
    return slots * one_slot + num_layers * 2 * 2 * hidden * entries + 2 * hidden * vocab
