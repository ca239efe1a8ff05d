"""Load a checkpoint (training/checkpointing.py layout) for generation."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def load_model_for_inference(load_dir: str, iteration: Optional[int] = None) -> Tuple[torch.nn.Module, object, int]:
    """(LatentGPTModel in eval mode, ModelConfig, iteration loaded) from checkpoint `load_dir`,
    as a world of one at TP=PP=1 whatever layout it was saved at. The local
    (non-Transformer-Engine) layer spec is used: the KV-cached decoder passes explicit padding
    masks that megatron's local attention honours at every step.
    """
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.training.checkpointing import load_single_process

    model, cfg, iteration = load_single_process(
        load_dir, iteration,
        lambda cfg: build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent_settings(), use_te=False),
    )
    return model.eval(), cfg, iteration
