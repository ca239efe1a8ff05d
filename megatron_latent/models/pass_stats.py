"""The pass loop's own signals, as cheap detached sums (no graph, a few reductions per pass).

A model with `pass_stats` set (a PassStats; None by default, the usual case) hands every pass's
input columns to it, from the single-stage loop (`LatentGPTModel.solve_thoughts`) or the first
pipeline stage (parallel/passes.py), one micro-batch after another. What it keeps:

* latent thoughts: the Jacobi residual of iteration i, ||T_i - T_(i-1)|| / ||T_(i-1)||, where T_i are
  the thought columns after i Jacobi passes (T_0 after the growth passes), norms over the whole
  batch; and the largest change of any thought element (what the tolerance prefill compares with
  its `tol`);
* the RMS norm of the thought inputs and of the token inputs of the final pass;
* extra loops: the relative change of the residual stream made by each loop pass but the last;
* interpolated thoughts: the mean entropy (nats) of the softmax that mixes the embeddings.

`PassStats.reduce` sums them over the ranks that recorded them (data-parallel replicas, the first
pipeline stage) and turns them into the logged values.
"""

from __future__ import annotations

import collections
import math
from typing import Deque, Dict, List

import torch
import torch.distributed as dist


class PassStats:
    def __init__(self):
        self._tensors: Dict[str, torch.Tensor] = {}  # device scalars, read once (one sync) in totals()
        self._max_tensors: Dict[str, torch.Tensor] = {}
        self._earlier: Dict[int, Deque[List[torch.Tensor]]] = collections.defaultdict(collections.deque)

    # ------------------------------------------------------------------------------ recording
    def _add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().double()
        self._tensors[key] = self._tensors[key] + v if key in self._tensors else v

    def _max(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().double()
        self._max_tensors[key] = torch.maximum(self._max_tensors[key], v) if key in self._max_tensors else v

    @torch.no_grad()
    def columns(self, latent, pass_index: int, columns: List[torch.Tensor], final: bool) -> None:
        """The input columns of pass `pass_index` of one micro-batch (`final`: the last pass)."""
        n = latent.num_latent_thoughts
        if n:
            current = [c.detach() for c in columns[1:]]
            if pass_index > n:  # the output of Jacobi iteration pass_index - n
                self._change(f"jacobi_{pass_index - n}", self._earlier[pass_index - 1].popleft(), current)
            if not final and pass_index >= n:
                self._earlier[pass_index].append(current)
            if final:
                self._add("token_sq", columns[0].float().pow(2).sum())
                count = columns[0][..., 0].numel()  # input vectors per column
                self._add("token_count", columns[0].new_tensor(count, dtype=torch.float64))
                self._add("thought_sq", sum(c.float().pow(2).sum() for c in current))
                self._add("thought_count", columns[0].new_tensor(count * len(current), dtype=torch.float64))
        elif latent.num_extra_loops:
            current = [columns[0].detach()]
            if pass_index > 0:
                self._change(f"loop_{pass_index}", self._earlier[pass_index - 1].popleft(), current)
            if not final:
                self._earlier[pass_index].append(current)

    def _change(self, key: str, before: List[torch.Tensor], after: List[torch.Tensor]) -> None:
        self._add(f"{key}_diff_sq", sum((a.float() - b.float()).pow(2).sum() for a, b in zip(after, before)))
        self._add(f"{key}_ref_sq", sum(b.float().pow(2).sum() for b in before))
        self._max(f"{key}_max_change", max((a.float() - b.float()).abs().max() for a, b in zip(after, before)))

    @torch.no_grad()
    def mixing_entropy(self, entropy: torch.Tensor) -> None:
        """Per-vector entropies of the interpolation softmax (models/interpolation.py)."""
        self._add("entropy_sum", entropy.float().sum())
        self._add("entropy_count", entropy.new_tensor(entropy.numel(), dtype=torch.float64))

    def totals(self):
        """(sums, maxes) as Python floats."""
        keys = list(self._tensors) + list(self._max_tensors)
        if not keys:
            return {}, {}
        values = torch.stack(list(self._tensors.values()) + list(self._max_tensors.values())).tolist()  # one sync
        sums = dict(zip(keys[:len(self._tensors)], values))
        return sums, dict(zip(keys[len(self._tensors):], values[len(self._tensors):]))

    # ------------------------------------------------------------------------------ reading
    @staticmethod
    def reduce(recorded: List["PassStats"], group=None) -> Dict[str, float]:
        """The logged values from this rank's recorders and every other rank's (one all-gather of
        a few floats; every rank of `group`, default the world, must call it). Tensor-parallel
        replicas record the same columns: each value is a ratio or a mean, which duplicates leave
        unchanged."""
        sums: Dict[str, float] = collections.defaultdict(float)
        maxes: Dict[str, float] = {}

        def merge(part):
            s, m = part
            for k, v in s.items():
                sums[k] += v
            for k, v in m.items():
                maxes[k] = max(maxes.get(k, v), v)

        for r in recorded:
            merge(r.totals())
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (dict(sums), maxes), group=group)
            sums, maxes = collections.defaultdict(float), {}
            for part in gathered:
                merge(part)
        return _values(sums, maxes)


def _values(sums: Dict[str, float], maxes: Dict[str, float]) -> Dict[str, float]:
    out = {}
    for key in sorted(maxes, key=lambda k: (k.split("_")[0], int(k.split("_")[1]))):
        kind, i = key.split("_")[:2]
        ref = sums[f"{kind}_{i}_ref_sq"]
        out[f"thoughts/jacobi_residual_{i}" if kind == "jacobi" else f"loops/change_{i}"] = (
            math.sqrt(sums[f"{kind}_{i}_diff_sq"] / ref) if ref > 0 else float("nan"))
        if kind == "jacobi":
            out[f"thoughts/jacobi_max_change_{i}"] = maxes[key]
    if sums.get("token_count"):
        token_rms = math.sqrt(sums["token_sq"] / sums["token_count"])
        thought_rms = math.sqrt(sums["thought_sq"] / sums["thought_count"])
        out["thoughts/token_input_rms"], out["thoughts/thought_input_rms"] = token_rms, thought_rms
        out["thoughts/input_norm_ratio"] = thought_rms / token_rms if token_rms > 0 else float("nan")
    if sums.get("entropy_count"):
        out["thoughts/mixing_entropy"] = sums["entropy_sum"] / sums["entropy_count"]
    return out
