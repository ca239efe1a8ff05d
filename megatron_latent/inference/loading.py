"""Load a checkpoint (`<dir>/model_config.json` + training/checkpointing.py layout) for generation."""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

import torch


def load_model_for_inference(load_dir: str, iteration: Optional[int] = None) -> Tuple[torch.nn.Module, object, int]:
    """(LatentGPTModel in eval mode, ModelConfig, iteration loaded) from checkpoint `load_dir`.

    Runs as a world of one (TP=PP=1; a process group is started when none exists): checkpoints
    are megatron dist_checkpoints with global shapes, so one saved at any TP/PP loads here. The
    local (non-Transformer-Engine) layer spec is used: the KV-cached decoder passes explicit
    padding masks that megatron's local attention honours at every step.
    """
    import torch.distributed as dist

    import megatron_latent  # noqa: F401  (CPU backend when CUDA is absent)
    from megatron_latent.hf.convert import load_config
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training.checkpointing import iteration_dir, load_checkpoint, read_latest_iteration

    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"--load {load_dir}: no such directory")
    cfg = load_config(load_dir)
    # Checked before any process group or model exists, so a wrong path fails at once.
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            raise FileNotFoundError(f"--load {load_dir}: no latest_checkpointed_iteration.txt (no complete checkpoint)")
    if not os.path.isdir(iteration_dir(load_dir, iteration)):
        raise FileNotFoundError(f"--iteration {iteration}: {iteration_dir(load_dir, iteration)} does not exist")
    if not dist.is_initialized():
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("load_model_for_inference runs as a single process")
    initialize_model_parallel(1, 1)
    model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent_settings(), use_te=False)
    state = load_checkpoint(load_dir, [model], iteration=iteration)
    return model.eval(), cfg, state["iteration"]
