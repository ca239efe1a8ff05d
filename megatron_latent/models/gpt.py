"""Build a megatron-core GPTModel (models.loss.FusedLossGPTModel, or a subclass: the latent model)
for any ModelConfig."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps

from megatron_latent.config import ModelConfig
from megatron_latent.models import seeding, specs
from megatron_latent.models.latent import LatentGPTModel
from megatron_latent.models.loss import FusedLossGPTModel
from megatron_latent.models.transformer_config import to_transformer_config


def build_gpt_model(
    cfg: ModelConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    config=None,
    use_te: Optional[bool] = None,
    parallel_output: bool = True,
    model_cls=FusedLossGPTModel,
    **model_kwargs,
):
    """This rank's part of the model described by `cfg`.

    pre_process / post_process: whether this (virtual) stage holds the embedding / the final norm
    and output layer; None reads them from megatron's parallel state. `config` is
    `to_transformer_config(cfg, ...)`, which checks the layout against `cfg` (default: at the
    current TP/PP sizes).
    The initial weights are a function of torch's default generator state (the seed) and each
    parameter's global name alone, the same at every TP, PP and virtual-pipeline layout
    (models.seeding); building does not advance the generator.
    `model_cls` and `model_kwargs` let the caller build a GPTModel subclass, e.g.
    ``build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent)``.
    """
    if config is None:
        vp = ps.get_virtual_pipeline_model_parallel_world_size()
        config = to_transformer_config(
            cfg,
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            vp,
        )
    stage = {} if vp_stage is None else {"ignore_virtual": False, "vp_stage": vp_stage}
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(**stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(**stage)
    if issubclass(model_cls, LatentGPTModel):
        model_kwargs.setdefault("latent", cfg.latent)
        model_kwargs.setdefault("token_vocab_size", cfg.vocab_size)
    rope = cfg.position_embedding_type == "rope"
    with seeding.model_streams():
        # The embedding is the first thing megatron builds; each layer draws from its own stream.
        with seeding.stream("embedding"):
            model = model_cls(
                config=config,
                transformer_layer_spec=specs.block_spec(cfg, config, vp_stage=vp_stage, use_te=use_te),
                vocab_size=cfg.padded_vocab_size,
                max_sequence_length=cfg.seq_length,
                pre_process=pre_process,
                post_process=post_process,
                parallel_output=parallel_output,
                share_embeddings_and_output_weights=cfg.tie_embeddings,
                position_embedding_type=cfg.position_embedding_type,
                rotary_percent=cfg.rotary_percent if rope else 1.0,
                rotary_base=cfg.rotary_base,
                rope_scaling=rope and cfg.rope_scaling,
                rope_scaling_factor=cfg.rope_scaling_factor,
                vp_stage=vp_stage,
                **model_kwargs,
            )
        if post_process and not cfg.tie_embeddings and config.perform_initialization:
            with seeding.stream("output_layer"):
                _redraw_output_layer(model.output_layer.weight, config)
    if pre_process and cfg.position_embedding_type == "learned_absolute":
        # megatron builds the learned position table in fp32 (Megatron-LM's Float16Module casts
        # whole models later); the weights here are built in params_dtype, so it is cast alike.
        model.embedding.position_embeddings.to(config.params_dtype)
    if config.use_cpu_initialization and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # drawn on the CPU (see platform.transformer_config_device_fields)
    return model


def _redraw_output_layer(weight, config) -> None:
    """Draw the (untied) output layer [V, H] whole from the current stream and keep this rank's
    rows, as megatron's CPU initialization does: megatron drew it after this stage's layers, which
    would make it depend on the pipeline layout."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = torch.empty(weight.shape[0] * tp, weight.shape[1], dtype=torch.float32)
    config.init_method(full)
    with torch.no_grad():
        weight.copy_(full.to(config.params_dtype).chunk(tp)[rank])
