"""Layer norms for the local (non-TE, non-apex) specs that also work with sequence parallelism.

megatron-core's WrappedTorchNorm refuses sequence parallelism, although a norm is per token and
needs nothing but its parameters marked `sequence_parallel` (their gradients are then summed over
the tensor-parallel ranks by `finalize_model_grads`, each rank having seen part of the sequence).
"""

from __future__ import annotations

import torch


class TorchNorm:
    """Factory with the signature megatron specs use: LayerNorm or RMSNorm per `config.normalization`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
