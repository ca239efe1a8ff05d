"""Measure the activation memory a training step holds: bytes saved for backward, live and peak.

Device allocators report everything (weights, gradients, optimizer state, workspace); what the
pipeline schedule changes is how many micro-batches' saved activations are alive at once. This
meter counts exactly those, on any device: tensors autograd saves for backward (deduplicated by
storage, parameters excluded), from the moment they are saved until their graph is freed.
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch


class _Saved:
    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter, tensor, key):
        self.meter, self.tensor, self.key = meter, tensor, key

    def __del__(self):
        self.meter._release(self.key)


class SavedActivationMeter:
    """``with SavedActivationMeter(model.parameters()) as m: step()`` then ``m.peak_bytes``."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter] = ()):
        self._params = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: Dict[int, list] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._params or storage.nbytes() == 0:
            return t
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, storage.nbytes()]
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1
        return _Saved(self, t, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key):
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current_bytes -= entry[1]
            del self._live[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        return False
