"""The embeddings mixed by the output softmax: PonderLM's feedback (pondering, and interpolated thoughts).

A thought fed this way is `softmax(output_layer(h)) @ E` (times the embedding scale) instead of
the hidden state `h` itself, optionally over the k likeliest tokens only (`topk`, renormalized:
the authors' `interpolation_topk`). The softmax runs over the tokenizer's rows only: the padded
rows of megatron's vocabulary are masked, so the mix is the one a Hugging Face export (which has
no padded rows) computes.

Under tensor parallelism the output layer and the embedding are both split by vocabulary rows,
rank r holding the same rows of each, so the mix is computed vocab-parallel without gathering the
logits: a max all-reduce (for stability, no gradient), then sum_r e_r @ E_r and sum_r e_r.sum()
with megatron's reduce region (forward all-reduce, identity backward) and one division.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.utils import VocabUtility


def interpolate_embeddings(hidden: torch.Tensor, head_weight: torch.Tensor, embedding_weight: torch.Tensor,
                           vocab_size: int, scale: float = 1.0, topk: int = 0,
                           record_entropy: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """`hidden` [..., H] (the same on every tensor-parallel rank) -> [..., H]: the softmax over
    `hidden @ head^T` (this rank's vocabulary rows of `head_weight`, the first `vocab_size` rows of
    the whole vocabulary only) mixing this rank's rows of `embedding_weight`, times `scale`.
    `record_entropy` (monitoring) is handed the softmax's entropy of every vector [...], detached."""
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    x = mappings.copy_to_tensor_model_parallel_region(hidden) if tp > 1 else hidden
    logits = torch.nn.functional.linear(x, head_weight)  # [..., V / tp]
    rows = head_weight.shape[0]
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        rows, ps.get_tensor_model_parallel_rank() if tp > 1 else 0, tp)
    if start + rows > vocab_size:  # padded rows on this rank
        logits = logits.masked_fill(torch.arange(start, start + rows, device=logits.device) >= vocab_size,
                                    float("-inf"))
    if topk:
        logits = _keep_topk(logits, topk, group)
    with torch.no_grad():
        top = logits.max(dim=-1, keepdim=True).values
        if group is not None:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(logits - top)
    mixed = e @ embedding_weight.to(e.dtype)
    total = e.sum(dim=-1, keepdim=True)
    if record_entropy is not None:
        record_entropy(_entropy(e.detach(), (logits - top).detach(), total.detach(), group))
    if group is not None:
        mixed = mappings.reduce_from_tensor_model_parallel_region(mixed)
        total = mappings.reduce_from_tensor_model_parallel_region(total)
    return (mixed / total * scale).to(hidden.dtype)


def _entropy(e, shifted, total, group) -> torch.Tensor:
    """-sum p log p with p = e / sum(e), log p = shifted - log sum(e), over the whole vocabulary."""
    weighted = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=-1, keepdim=True)
    both = torch.cat([weighted, total], dim=-1).float()
    if group is not None:
        torch.distributed.all_reduce(both, group=group)
    return torch.log(both[..., 1]) - both[..., 0] / both[..., 1]


def _keep_topk(logits: torch.Tensor, k: int, group) -> torch.Tensor:
    """Mask all but the k largest logits of the whole vocabulary (ties at the k-th value kept)."""
    with torch.no_grad():
        local = logits.topk(min(k, logits.shape[-1]), dim=-1).values
        if group is not None:
            parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, local.contiguous(), group=group)
            local = torch.cat(parts, dim=-1)
        kth = local.topk(min(k, local.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))
