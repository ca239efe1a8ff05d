"""The bridge from a `ModelConfig` to megatron-core's `TransformerConfig`.

`to_transformer_config(cfg, tp, pp, vp, **overrides)` checks the layout against the model
(`ParallelLayout.check_model`) and returns the TransformerConfig every model builder takes: the
model's sizes and architecture, its init (models/init.py), the device's choices
(`platform.transformer_config_device_fields`) and the caller's overrides, refused where
megatron-core cannot run them (`compat.unsupported_recompute`).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer import TransformerConfig

from megatron_latent import compat, platform
from megatron_latent.config.errors import ConfigError
from megatron_latent.config.layout import ParallelLayout
from megatron_latent.config.model import ModelConfig
from megatron_latent.models.init import init_methods


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new" (tanh approximation). A named function, so configs stay picklable."""
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS = {"gelu": torch.nn.functional.gelu, "gelu_tanh": gelu_tanh,
                        "swiglu": torch.nn.functional.silu, "squared_relu": squared_relu}


def to_transformer_config(
    cfg: ModelConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """megatron-core TransformerConfig of `cfg` at this layout (checked); `overrides` are
    TransformerConfig fields (sequence_parallel, recompute_granularity, bf16, ...)."""
    ParallelLayout(
        tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
        sequence_parallel=bool(overrides.get("sequence_parallel", False)),
    ).check_model(cfg)
    kw = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        activation_func=ACTIVATION_FUNCTIONS[cfg.activation],
        gated_linear_unit=cfg.gated,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        layernorm_zero_centered_gamma=cfg.apply_layernorm_1p,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        **platform.transformer_config_device_fields(),
        **init_methods(cfg),
    )
    if params_dtype == torch.bfloat16:
        kw["bf16"] = True
    elif params_dtype == torch.float16:
        kw["fp16"] = True
    kw.update(overrides)
    why = compat.unsupported_recompute(kw, cfg.add_bias_linear and not cfg.parallel_residual, cfg.name)
    if why:
        raise ConfigError(why)
    return TransformerConfig(**kw)
