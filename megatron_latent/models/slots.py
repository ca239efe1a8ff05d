"""The slot layout of a latent-thought sequence, as pure functions on megatron's [s, b, h] tensors.

Position i of an L-token sequence holds `num_slots` consecutive slots: slot 0 is the token,
slot k (1..N) is thought k. The interleaved sequence is

    [x_1, z_1^1 .. z_1^N, x_2, z_2^1 .. z_2^N, ...]      (length num_slots * L)

so slot k of position i sits at index i * num_slots + k. Every slot of position i has position
id i, and attends causally over the interleaved sequence. Shared by training, evaluation, the
pipeline wiring and inference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def interleave(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """One [L, b, h] column per slot (column 0 = tokens, column k = thought k) -> [len(columns) * L, b, h]."""
    if len(columns) == 1:
        return columns[0]
    return torch.stack(list(columns), dim=1).flatten(0, 1)


def take_slot(x: torch.Tensor, k: int, num_slots: int) -> torch.Tensor:
    """Slot k of every position of an interleaved [num_slots * L, ...] tensor -> [L, ...]."""
    if num_slots == 1:
        return x
    return x.unflatten(0, (-1, num_slots))[:, k]


def split_slots(x: torch.Tensor, num_slots: int) -> list:
    """All slots of an interleaved tensor: the inverse of `interleave`."""
    return [take_slot(x, k, num_slots) for k in range(num_slots)]


def slot_position_ids(position_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Token position ids [b, L] -> slot position ids [b, num_slots * L] (each repeated)."""
    return position_ids.repeat_interleave(num_slots, dim=1)


def slot_attention_mask(attention_mask: Optional[torch.Tensor], num_slots: int) -> Optional[torch.Tensor]:
    """Token-level mask [b|1, 1, L, L] (True = masked out) -> slot-level [b|1, 1, S, S].

    Slot (i, a) may see slot (j, c) iff token i may see token j and, within one position, c <= a.
    A token-level mask that is causal (with document resets or not) thus expands to the causal
    mask over the interleaved sequence with the same resets. None (plain causal) stays None.
    """
    if attention_mask is None or num_slots == 1:
        return attention_mask
    m = attention_mask.repeat_interleave(num_slots, dim=-2).repeat_interleave(num_slots, dim=-1)
    s = m.shape[-1]
    idx = torch.arange(s, device=m.device)
    same_position = (idx[:, None] // num_slots) == (idx[None, :] // num_slots)
    later_slot = idx[None, :] > idx[:, None]
    return m | (same_position & later_slot)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """[1, 1, S, S] boolean causal mask, True = masked out (megatron's convention)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]
