"""GPT-NeoX's parallel attention + MLP residual as a megatron-core TransformerLayer.

    y = x + attn(ln1(x)) + mlp(ln2(x))            (GPT-NeoX `use_parallel_residual=True`)

Both branches read the layer input, so under tensor parallelism the row-parallel output
projections (attention `linear_proj`, MLP `linear_fc2`) can hand back their partial sums and the
layer reduces `attn_partial + mlp_partial` once: one all-reduce per layer (or one reduce-scatter
with sequence parallelism) instead of two. That is what `PartialSumRowParallelLinear` is for; the
layer also accepts ordinary row-parallel projections (e.g. Transformer Engine's, which reduce
internally) and then just adds the two reduced outputs.

Dropout: with a single reduce the hidden dropout is applied once to the summed branch outputs
(GPT-NeoX drops each branch separately). Both are identity at the paper's dropout 0.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_latent.models.linear import LocalRowParallelLinear


class PartialSumRowParallelLinear(LocalRowParallelLinear):
    """RowParallelLinear that returns this rank's partial sum unreduced, and its bias separately.

    The caller owns the reduction (ParallelResidualTransformerLayer sums two of these first). At
    one rank the partial sum is the whole product and the bias is added in it (LocalRowParallelLinear).
    """

    returns_partial_sum = True

    def __init__(self, *args, **kwargs):
        kwargs["skip_bias_add"] = True  # the bias must be added once, after the reduction
        super().__init__(*args, **kwargs)
        if self.explicit_expert_comm:
            raise ValueError("PartialSumRowParallelLinear is for dense layers, not experts")

    def forward(self, input_):
        if self.single_rank:
            return super().forward(input_)
        if not self.input_is_parallel:
            raise ValueError("PartialSumRowParallelLinear needs input_is_parallel=True")
        out = self._forward_impl(
            input=input_,
            weight=self.weight,
            bias=None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            tp_group=None,
            grad_output_buffer=None,
        )
        return out, self.bias


class ParallelResidualTransformerLayer(TransformerLayer):
    """TransformerLayer computing x + attn(ln1(x)) + mlp(ln2(x)) with one tensor-parallel reduce.

    Built from the same submodules as megatron's TransformerLayer (input_layernorm, self_attention,
    pre_mlp_layernorm, mlp, self_attn_bda/mlp_bda); cross attention is not supported. The
    projections `self_attention.linear_proj` and `mlp.linear_fc2` must either both return partial
    sums (PartialSumRowParallelLinear) or both reduce themselves.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        partial = [
            getattr(m, "returns_partial_sum", False)
            for m in (self.self_attention.linear_proj, self.mlp.linear_fc2)
        ]
        if partial[0] != partial[1]:
            raise ValueError(
                "parallel residual layer: linear_proj and linear_fc2 must both return partial sums "
                "or both reduce"
            )
        self.partial_sums = partial[0]
        # Selective recompute of the norms is wired into TransformerLayer's sequential path, which
        # this layer does not take; full-layer recompute (TransformerBlock) and "mlp" are honoured.
        self.recompute_input_layernorm = False
        self.recompute_pre_mlp_layernorm = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        inference_context: Optional[Any] = None,
        packed_seq_params=None,
        sequence_len_offset: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        if context is not None:
            raise ValueError("the parallel residual layer has no cross attention")
        residual = hidden_states

        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_in = self.pre_mlp_layernorm(hidden_states)
        if self.recompute_mlp:
            # Checkpoint the output only: a bias Parameter returned through megatron's
            # CheckpointFunction gets that function as its grad_fn and backward recurses forever.
            mlp_out = tensor_parallel.checkpoint(lambda x: self.mlp(x)[0], False, mlp_in)
            fc2 = self.mlp.linear_fc2
            # At one rank models.linear adds the bias inside the product already.
            mlp_bias = fc2.bias if self.config.add_bias_linear and not getattr(fc2, "single_rank", False) else None
        else:
            mlp_out, mlp_bias = self.mlp(mlp_in)

        out = attn_out + mlp_out
        if self.partial_sums and self.config.tensor_model_parallel_size > 1:
            # The single reduction of the layer: sum of both branches' partial products.
            if self.config.sequence_parallel:
                out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        biases = [b for b in (attn_bias, mlp_bias) if b is not None]
        bias = biases[0] + biases[1] if len(biases) == 2 else (biases[0] if biases else None)

        with self.bias_dropout_add_exec_handler():
            hidden_states = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                (out, bias), residual, self.hidden_dropout
            )
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
        return output, context
