"""megatron-core layer specs per architecture family (ModuleSpec), local or Transformer Engine.

One spec builder covers every family; they differ in the layer class (sequential residual
or GPT-NeoX's parallel residual), in the per-head query/key norms (`qk_layernorm`), and otherwise
only in TransformerConfig fields (normalization, activation, gated MLP, biases, query groups) that
megatron's modules read themselves.

* local (CPU, or GPU without TE): megatron's ColumnParallel/RowParallelLinear (one F.linear each
  at one tensor-parallel rank: models.linear) and DotProductAttention (over torch's fused
  attention kernel: models.attention), norms from `models.norms.TorchNorm` (sequence-parallel
  capable), and a SelfAttention whose KV cache holds rotated keys, head by head
  (models.cached_attention).
* Transformer Engine (chosen automatically when `transformer_engine` imports and CUDA is present):
  norms fused into the following linear (TELayerNormColumnParallelLinear), TE attention and
  row-parallel linears. With TE the parallel-residual layer reduces twice (TE's row-parallel
  linear reduces internally); the local spec reduces once.

Either way each layer draws its initial weights from its own stream, seeded by its global index
(models.seeding), so that the pipeline layout does not change the model.

The state-dict names of the two flavours differ only in where the norms live; the sharded
(distributed-checkpoint) names are the same, as in megatron's own GPT specs.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_latent.config import ModelConfig
from megatron_latent.models.attention import FusedDotProductAttention
from megatron_latent.models.cached_attention import CachedRotarySelfAttention
from megatron_latent.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear
from megatron_latent.models.norms import TorchNorm
from megatron_latent.models.parallel_residual import (
    ParallelResidualTransformerLayer,
    PartialSumRowParallelLinear,
)
from megatron_latent.models.seeding import SeededLayer

# Local norms are stored as `input_layernorm.*` / `pre_mlp_layernorm.*`; distributed checkpoints
# use TE's fused names so that local and TE models load each other's checkpoints.
_SHARDED_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class SeededTransformerLayer(SeededLayer, TransformerLayer):
    """megatron's TransformerLayer, its weights drawn from its own stream (models.seeding)."""


class SeededParallelResidualTransformerLayer(SeededLayer, ParallelResidualTransformerLayer):
    """The parallel-residual layer, its weights drawn from its own stream (models.seeding)."""


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(cfg: ModelConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """The transformer layer spec of `cfg`'s family (TE when available unless `use_te` says)."""
    use_te = transformer_engine_available() if use_te is None else use_te
    layer = SeededParallelResidualTransformerLayer if cfg.parallel_residual else SeededTransformerLayer
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        qkv, fc1, proj, fc2, attn = (
            TELayerNormColumnParallelLinear, TELayerNormColumnParallelLinear,
            TERowParallelLinear, TERowParallelLinear, TEDotProductAttention,
        )
        self_attn = SelfAttention
        in_norm = mlp_norm = IdentityOp
        qk_norm = TENorm if cfg.qk_layernorm else IdentityOp
        keys_map = {}
    else:
        qkv = fc1 = LocalColumnParallelLinear
        # Parallel residual: both projections hand back partial sums, the layer reduces once.
        proj = fc2 = PartialSumRowParallelLinear if cfg.parallel_residual else LocalRowParallelLinear
        attn = FusedDotProductAttention
        self_attn = CachedRotarySelfAttention
        in_norm = mlp_norm = TorchNorm
        qk_norm = TorchNorm if cfg.qk_layernorm else IdentityOp
        keys_map = dict(_SHARDED_KEYS_MAP)
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=in_norm,
            self_attention=ModuleSpec(
                module=self_attn,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=attn, linear_proj=proj,
                    q_layernorm=qk_norm, k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def block_spec(cfg: ModelConfig, config, vp_stage: Optional[int] = None, use_te: Optional[bool] = None):
    """TransformerBlockSubmodules for this rank's (virtual) pipeline stage: the layers and the
    final norm (TorchNorm locally so that sequence parallelism works; TENorm with TE)."""
    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = TorchNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg, use_te)] * n, layer_norm=final_norm)
