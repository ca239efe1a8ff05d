"""What a checkpoint directory holds and how to read its model, below training and export.

    <root>/iter_0000100/                      a dist_checkpointing directory (torch_dist format)
    <root>/latest_checkpointed_iteration.txt  the newest complete iteration
    <root>/model_config.json                  the newest iteration's ModelConfig

training/checkpointing.py writes this layout (with optimizer state); generation, export and
conversion read it through this module, which imports nothing of the package but the config.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from megatron_latent.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """The newest complete iteration under `root`, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}") from None


def resolve_iteration(root: str, iteration: Optional[int] = None) -> int:
    """`iteration`, or the latest complete one, checked to exist; FileNotFoundError names the flag."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--load {root}: no such directory")
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"--load {root}: no {TRACKER} (no complete checkpoint there)")
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise FileNotFoundError(f"--iteration {iteration}: {iteration_dir(root, iteration)} does not exist")
    return iteration


def model_config_text(cfg: ModelConfig) -> str:
    """The contents of model_config.json for `cfg`."""
    return json.dumps(cfg.to_dict(), indent=2)


def write_model_config(cfg: ModelConfig, root: str) -> None:
    """Write `root`/model_config.json atomically (save_checkpoint does it through `root_files`)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MODEL_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(model_config_text(cfg))
    os.replace(path + ".tmp", path)


def read_model_config(root: str) -> ModelConfig:
    """The ModelConfig of `root`/model_config.json (the newest iteration's)."""
    path = os.path.join(root, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--load {root}: no {MODEL_CONFIG_FILE} there")
    with open(path) as f:
        return ModelConfig.from_dict(json.load(f))


def read_common(root: str, iteration: int) -> Dict[str, Any]:
    """The plain (non-tensor) part of a checkpoint: iteration, extra, scheduler state."""
    return dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))


def checkpoint_model_config(root: str, iteration: int, common: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """The ModelConfig iteration `iteration` was saved with: its own copy in `extra`, else (older
    checkpoints) the directory's model_config.json, which describes the newest iteration.
    `common`: the iteration's read_common, when the caller has it already."""
    if common is None:
        common = read_common(root, iteration)
    saved = common.get("extra", {}).get("model_config")
    return ModelConfig.from_dict(saved) if saved is not None else read_model_config(root)


def _chunk_keys(model_chunks: List[torch.nn.Module]):
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        yield key, unwrap_model(chunk)


def model_sharded_state_dict(model_chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """The model part of a checkpoint's sharded state dict (one entry per virtual-pipeline chunk)."""
    return {key: module.sharded_state_dict() for key, module in _chunk_keys(model_chunks)}


def load_model_state(model_chunks: List[torch.nn.Module], loaded: Dict[str, Any]) -> None:
    """Copy the model entries of a loaded checkpoint into the chunks (strict)."""
    for key, module in _chunk_keys(model_chunks):
        module.load_state_dict(loaded[key], strict=True)


def load_model_weights(root: str, iteration: int, model_chunks: List[torch.nn.Module]) -> None:
    """Fill the chunks with iteration `iteration`'s weights (no optimizer state), resharded to the
    current parallel layout."""
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), iteration_dir(root, iteration))
    load_model_state(model_chunks, loaded)
