"""How many Jacobi passes inference needs: a latent model's loss on held-out windows at each
evaluation J, beside the loss of the exact sequential rollout (reference.py) that Jacobi converges
to. Every loss here goes through the same logits -> fp32 cross entropy, so two settings differ
only by the hidden states the forward reached.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy
import torch
import torch.nn.functional as F

from megatron_latent.inference.reference import sequential_logits

ROLLOUT = "exact"  # the key of the sequential rollout's loss in jacobi_losses' answer


def spread_windows(stream: numpy.ndarray, seq_length: int, count: int) -> torch.Tensor:
    """[count, seq_length + 1] token windows at evenly spaced offsets over `stream` (inputs and
    their next tokens), so a held-out split is sampled from end to end, not only its start."""
    width = seq_length + 1
    if count < 1 or len(stream) < count * width:
        raise ValueError(f"{len(stream)} tokens hold fewer than {count} windows of {width} tokens")
    starts = numpy.linspace(0, len(stream) - width, count).astype(numpy.int64)
    return torch.as_tensor(numpy.stack([stream[s : s + width] for s in starts]), dtype=torch.long)


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss (nats) of logits [b, L, V] against labels [b, L]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")


@torch.no_grad()
def jacobi_losses(model, windows: torch.Tensor, jacobi: Sequence[int], rollout: bool = True,
                  batch_size: int = 16) -> Dict[object, float]:
    """{J: mean loss (nats/token)} for every evaluation J in `jacobi`, plus {ROLLOUT: loss} of the
    exact sequential rollout when `rollout`, over `windows` [M, L + 1] (spread_windows). The model
    is a LatentGPTModel in one process (loading.load_model_for_inference); it is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    keys = list(jacobi) + ([ROLLOUT] if rollout else [])
    total = {k: 0.0 for k in keys}
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        tokens, labels = w[:, :-1], w[:, 1:]
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        for k in keys:
            if k == ROLLOUT:
                logits = sequential_logits(model, tokens, pos)
            else:
                logits = model(tokens, pos, None, num_jacobi_iters=k)
            total[k] += float(_mean_loss(logits, labels))
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {k: v / count for k, v in total.items()}


def bits_per_byte(loss: float, tokens_per_byte: Optional[float]) -> Optional[float]:
    """Loss in nats per token as bits per byte of text, given the text's tokens per UTF-8 byte."""
    return None if tokens_per_byte is None else loss * tokens_per_byte / math.log(2)
