"""How many Jacobi passes inference needs: a latent model's loss and next-token accuracy on
held-out windows at each evaluation J and Jacobi tolerance, with the passes and FLOPs each spent,
beside the exact sequential rollout (reference.py) that Jacobi converges to. Every loss here goes
through the same logits -> fp32 cross entropy, so two settings differ only by the hidden states
the forward reached.
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
    keys = list(jacobi) + ([ROLLOUT] if rollout else [])
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {k: loss / count for k, (loss, _, _) in _solve(model, windows, keys, {}, batch_size).items()}


def tolerance_key(tol: float) -> str:
    """The key of a tolerance prefill's scores in jacobi_scores' answer."""
    return f"tol={tol:g}"


@torch.no_grad()
def jacobi_scores(model, cfg, windows: torch.Tensor, jacobi: Sequence[int], tolerances: Sequence[float] = (),
                  rollout: bool = True, batch_size: int = 16) -> Dict[object, dict]:
    """What each way of solving a window's thoughts costs and scores: {setting: {"loss" (nats/token),
    "accuracy" (top-1 next-token), "jacobi_passes" (mean per batch; None for the rollout),
    "flops_per_token" (models/flops.py for `cfg`, the model's ModelConfig: the forward with every
    position's logits)}}.

    Settings: every evaluation J in `jacobi` (the training forward), every tolerance in `tolerances`
    (key `tolerance_key(tol)`: Jacobi passes until no thought moves by more than tol, as the
    prefill and the exported model's "tolerance" mode run them), and the exact sequential rollout
    (ROLLOUT) when `rollout`, whose cost is that of KV-cached decoding of every token."""
    from megatron_latent.models.flops import model_decode_flops, model_step_flops

    keys = list(jacobi) + [tolerance_key(t) for t in tolerances] + ([ROLLOUT] if rollout else [])
    tol_of = {tolerance_key(t): t for t in tolerances}
    count = windows.shape[0] * (windows.shape[1] - 1)
    seq = windows.shape[1] - 1
    out = {}
    for k, (loss, correct, passes) in _solve(model, windows, keys, tol_of, batch_size).items():
        if k == ROLLOUT:
            flops = sum(model_decode_flops(cfg, p) for p in range(seq))
        else:
            flops = sum(model_step_flops(cfg, seq, j, training=False) for j in passes) / len(passes)
        out[k] = {"loss": loss / count, "accuracy": correct / count,
                  "jacobi_passes": None if k == ROLLOUT else sum(passes) / len(passes),
                  "flops_per_token": flops / seq}
    return out


def _solve(model, windows, keys, tol_of, batch_size) -> Dict[object, list]:
    """{setting: [summed loss, correct tokens, Jacobi passes per batch]} over `windows`."""
    from megatron_latent.inference.generate import decode_logits
    from megatron_latent.inference.params import PrefillParams

    model.eval()
    device = next(model.parameters()).device
    total = {k: [0.0, 0, []] for k in keys}
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        tokens, labels = w[:, :-1], w[:, 1:]
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        for k in keys:
            if k == ROLLOUT:
                logits = sequential_logits(model, tokens, pos)
            elif k in tol_of:
                res = decode_logits(model, tokens, decode_steps=0, prefill=PrefillParams("tolerance", tol=tol_of[k]))
                logits = res.logits
                total[k][2].append(res.prefill_iters)
            else:
                logits = model(tokens, pos, None, num_jacobi_iters=k)
                total[k][2].append(k)
            total[k][0] += float(_mean_loss(logits, labels))
            total[k][1] += int((logits.argmax(-1) == labels).sum())
    return total


def bits_per_byte(loss: float, tokens_per_byte: Optional[float]) -> Optional[float]:
    """Loss in nats per token as bits per byte of text, given the text's tokens per UTF-8 byte."""
    return None if tokens_per_byte is None else loss * tokens_per_byte / math.log(2)
