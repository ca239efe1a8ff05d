"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded
torch.Generator (same seed, same tokens)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_latent.inference.params import SamplingParams


def make_generator(params: SamplingParams, device) -> torch.Generator:
    """The sampling generator: seeded with `params.seed` (same seed, same tokens), else fresh."""
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None):
    """Next token per row of `logits` [b, V] -> [b] long."""
    logits = logits.float()
    if params.vocab_size is not None and params.vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, params.vocab_size:] = float("-inf")
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
