"""Load a checkpoint (checkpoint_layout.py) whole into this process, for generation and export."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from megatron_latent.checkpoint_layout import checkpoint_model_config, load_model_weights, resolve_iteration
from megatron_latent.config import ModelConfig
from megatron_latent.models.gpt import build_gpt_model
from megatron_latent.models.latent import LatentGPTModel
from megatron_latent.parallel.initialize import initialize_single_process


def load_single_process(
    root: str, iteration: Optional[int], build_model: Callable[[ModelConfig], torch.nn.Module]
) -> Tuple[torch.nn.Module, ModelConfig, int]:
    """(model, ModelConfig, iteration): `build_model(cfg)` filled from checkpoint `root`, in this
    process as a world of one (TP=PP=1; a process group is started when none exists). Checkpoints
    hold global shapes, so one saved at any TP/PP layout loads here. For export and generation."""
    # Checked before any process group or model exists, so a wrong path fails at once.
    iteration = resolve_iteration(root, iteration)
    cfg = checkpoint_model_config(root, iteration)
    initialize_single_process("loading a checkpoint for export or generation")
    model = build_model(cfg)
    load_model_weights(root, iteration, [model])
    return model, cfg, iteration


def load_model_for_inference(load_dir: str,
                             iteration: Optional[int] = None) -> Tuple[torch.nn.Module, ModelConfig, int]:
    """(LatentGPTModel in eval mode, ModelConfig, iteration loaded) from checkpoint `load_dir`,
    as a world of one at TP=PP=1 whatever layout it was saved at. The local
    (non-Transformer-Engine) layer spec is used: the KV-cached decoder passes explicit padding
    masks that megatron's local attention honours at every step.
    """
    model, cfg, iteration = load_single_process(
        load_dir, iteration,
        lambda cfg: build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False),
    )
    return model.eval(), cfg, iteration
