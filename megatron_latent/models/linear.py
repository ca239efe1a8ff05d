"""megatron's local Column/RowParallelLinear, computed by torch's F.linear when there is one rank.

Without tensor parallelism megatron's local linears still run their parallel machinery: a custom
autograd Function (the weight gradient and the input gradient computed in Python in the backward,
once per linear and pass), identity copy/reduce Functions around it, and the bias added in a
separate kernel: by the linear itself, or, for the linears that hand their bias back
(`skip_bias_add`: the MLP's fc1, both output projections), by the next module. torch's F.linear is
one addmm with the bias in it, and autograd differentiates it in C++. The latent model runs every
linear once per Jacobi pass, so on the CPU this was a few percent of a training step
(docs/benchmarks.md).

At one tensor-parallel rank these classes return F.linear's output with the bias already added and
no bias to add: megatron's consumers (the MLP's activation, bias-dropout-add) accept a None bias,
as they do for models without biases. The result is megatron's up to rounding (checked in
tests/test_linear.py); at more ranks, with sequence parallelism, gradient-accumulation fusion,
deferred embedding gradients or a fused bias-activation, they are megatron's classes unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


def _single_rank(linear) -> bool:
    c = linear.config
    return (
        get_pg_size(linear.tp_group) == 1
        and not linear.sequence_parallel
        and not linear.explicit_expert_comm
        and not linear.gradient_accumulation_fusion
        and not c.defer_embedding_wgrad_compute
        # megatron's fused bias-activation kernels need the bias handed back.
        and not c.bias_activation_fusion
    )


class LocalColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear (same constructor and parameters); F.linear at one rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.single_rank = _single_rank(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.single_rank or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        return F.linear(input_, self.weight, self.bias), None


class LocalRowParallelLinear(RowParallelLinear):
    """RowParallelLinear (same constructor and parameters); F.linear at one rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.single_rank = _single_rank(self)

    def forward(self, input_):
        if not self.single_rank:
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None
