"""megatron's GPTModel with torch's fused cross entropy when the vocabulary is whole.

megatron computes the loss with its vocabulary-parallel cross entropy on every layout: a Python
autograd Function, three collectives (max, sum of exponentials, target logit) and a handful of
elementwise kernels, also at one tensor-parallel rank, where the vocabulary is not split. There
torch's cross entropy (log-softmax and NLL, C++ backward) gives the same per-token loss up to
rounding. Every model this project builds is this class or the latent model, its subclass, so the
vanilla and the latent model compute the same loss with the same kernel.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel


class FusedLossGPTModel(GPTModel):
    """GPTModel (same constructor and parameters) whose loss at one tensor-parallel rank is
    torch's cross entropy."""

    def compute_language_model_loss(self, labels, logits):
        """Per-token loss [b, s] from labels [b, s] and logits [s, b, V], as megatron's."""
        if ps.get_tensor_model_parallel_world_size() > 1 or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        s, b, v = logits.shape
        loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none")
        return loss.view(s, b).t().contiguous()
