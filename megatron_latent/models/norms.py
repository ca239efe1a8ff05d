"""Layer norms for the local (non-TE, non-apex) specs that also work with sequence parallelism.

megatron-core's WrappedTorchNorm refuses sequence parallelism, although a norm is per token and
needs nothing but its parameters marked `sequence_parallel` (their gradients are then summed over
the tensor-parallel ranks by `finalize_model_grads`, each rank having seen part of the sequence).
With `layernorm_zero_centered_gamma` (Megatron-LM's --apply-layernorm-1p) the norm scales by
1 + weight, the weight starting at zero (so weight decay pulls the scale towards 1, not 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class _ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class TorchNorm:
    """Factory with the signature megatron specs use: LayerNorm or RMSNorm per `config.normalization`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        one_p = getattr(config, "layernorm_zero_centered_gamma", False)
        if config.normalization == "LayerNorm":
            kind = _ZeroCenteredLayerNorm if one_p else torch.nn.LayerNorm
        elif config.normalization == "RMSNorm":
            kind = _ZeroCenteredRMSNorm if one_p else torch.nn.RMSNorm
        else:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm")
        norm = kind(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
