"""Perplexity of a Hugging Face causal LM (stock or our latent export) over a token stream.

The stream (a text file's tokens, or the documents of a megatron indexed dataset concatenated, each
ending in its EOD as written by preprocessing) is cut into consecutive windows of `seq_length`
tokens; in each window every token but the first is predicted from the ones before it. Windows of
equal length are batched; the model sees no padding.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy
import torch


def dataset_tokens(prefix: str, max_tokens: Optional[int] = None) -> numpy.ndarray:
    """The documents of the indexed dataset `prefix` (`.bin/.idx`) back to back."""
    from megatron_latent.data.indexed import open_dataset

    ds = open_dataset(prefix)
    parts, total = [], 0
    for i in range(len(ds)):
        doc = numpy.asarray(ds[i], dtype=numpy.int64)
        parts.append(doc)
        total += len(doc)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = numpy.concatenate(parts) if parts else numpy.zeros(0, dtype=numpy.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


def windows(stream, seq_length: int) -> list:
    """Consecutive windows of `seq_length` tokens (the last may be shorter; one token is dropped)."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    out = [stream[i : i + seq_length] for i in range(0, len(stream), seq_length)]
    return [torch.as_tensor(numpy.asarray(w), dtype=torch.long) for w in out if len(w) >= 2]


@torch.no_grad()
def perplexity(model, token_windows: Iterable[torch.Tensor], batch_size: int = 8, progress: bool = False,
               **forward_kwargs) -> dict:
    """{"tokens", "nll" (mean, nats), "ppl"} over the predicted tokens of `token_windows`."""
    from tqdm import tqdm

    token_windows = list(token_windows)
    device = next(model.parameters()).device
    batches = []
    for length in sorted({len(w) for w in token_windows}, reverse=True):
        same = [w for w in token_windows if len(w) == length]
        batches += [torch.stack(same[i : i + batch_size]) for i in range(0, len(same), batch_size)]
    total_nll, count = 0.0, 0
    bar = tqdm(total=sum(len(w) - 1 for w in token_windows), unit="tok", disable=not progress, desc="perplexity")
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, **forward_kwargs).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        count += ids[:, 1:].numel()
        bar.update(ids[:, 1:].numel())
        bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}")
    bar.close()
    if count == 0:
        raise ValueError("no tokens to score (the input is shorter than 2 tokens)")
    return {"tokens": count, "nll": total_nll / count, "ppl": math.exp(total_nll / count)}
