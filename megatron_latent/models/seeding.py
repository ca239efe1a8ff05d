"""Initial weights that are the same model at every parallel layout.

megatron draws each weight whole on the CPU and keeps this rank's slice (`use_cpu_initialization`),
so the tensor-parallel size never changes the model. The pipeline layout would: every stage starts
drawing at the same generator state, so a layer's weights would depend on which (virtual) stage
builds it. Here each part of the model draws from its own stream instead, seeded from one base seed
and the part's name: the embedding (`embedding`), each decoder layer by its global index
(`decoder.layers.i`) and the output layer (`output_layer`). The weights are then a function of the
base seed and the parameter alone, at any TP, PP and virtual-pipeline size, on CPU and GPU alike
(all draws come from torch's CPU generator; megatron's CUDA RNG tracker, which keeps the dropout
streams, is not touched).

The base seed is drawn from torch's default generator when the model is built, without advancing
it: `initialize_model_parallel(seed=...)` (the driver's `--seed`) or `torch.manual_seed` decides
the model, and building leaves the generator as it found it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional

import torch
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

# The base seed of the model being built (None outside `model_streams`).
_base: Optional[int] = None


@contextlib.contextmanager
def _restoring_generator() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextlib.contextmanager
def model_streams() -> Iterator[None]:
    """Build a model (or one pipeline chunk of it) in here: its parts draw from their own streams,
    and torch's default generator is left as it was. Chunks built one after another share the
    base seed, since none of them advances the generator."""
    global _base
    outer = _base
    with _restoring_generator():
        if outer is None:
            _base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        try:
            yield
        finally:
            _base = outer


@contextlib.contextmanager
def stream(name: str) -> Iterator[None]:
    """Draws in here come from the stream of part `name` (outside `model_streams`: unchanged)."""
    if _base is None:
        yield
        return
    with _restoring_generator():
        digest = hashlib.sha256(f"{_base}/{name}".encode()).digest()
        torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield


class SeededLayer:
    """Mixin for a megatron TransformerLayer: it draws its weights from the stream of its global
    index (the same layer at every pipeline and virtual-pipeline layout)."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        # megatron's own offset of this (virtual) stage's first layer, as TransformerLayer reads it.
        index = layer_number - 1 + get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        with stream(f"decoder.layers.{index}"):
            super().__init__(config, submodules, layer_number, *args, **kwargs)
