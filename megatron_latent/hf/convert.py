"""Hugging Face folder -> megatron checkpoint (continued pretraining from public weights).

The checkpoint is written with megatron `dist_checkpointing` (training/checkpointing.py), whose
tensors carry their global shapes: it is written from one process and loads at any TP/PP layout.
The requested layout is checked up front, so an impossible one fails before anything is written.
Next to the iteration directory, `model_config.json` holds the ModelConfig the weights belong to.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, Optional, Tuple

import torch
import transformers
from safetensors.torch import load_file

from megatron_latent.checkpoint_layout import MODEL_CONFIG_FILE, model_config_text
from megatron_latent.config import ModelConfig, ParallelLayout
from megatron_latent.hf.layout import StateDict, load_full_into_model
from megatron_latent.hf.mapping import SUPPORTED, base_model_type, config_from_hf, hf_to_megatron
from megatron_latent.models.gpt import build_gpt_model
from megatron_latent.parallel.initialize import initialize_single_process
from megatron_latent.training.checkpointing import save_checkpoint


def read_hf_folder(hf_dir: str) -> Tuple[StateDict, object]:
    """(state dict, config) of a local HF model folder: config.json plus *.safetensors or
    pytorch_model*.bin (sharded or not). The architecture is checked before weights are read."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hf_dir {hf_dir}: no config.json there")
    with open(path) as f:
        raw = json.load(f)
    base = base_model_type(raw.get("model_type"))
    if base not in SUPPORTED:
        arch = (raw.get("architectures") or [raw.get("model_type")])[0]
        names = ", ".join(SUPPORTED.values())
        raise ValueError(f"hf_dir {hf_dir}: unsupported architecture {arch} (config.json); supported: {names}")
    if base != raw["model_type"]:
        # Our latent export: read it with the stock config class (the latent fields stay attributes)
        # instead of running the folder's code.
        hf_config = transformers.CONFIG_MAPPING[base].from_dict({**raw, "model_type": base})
    else:
        hf_config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    state: Dict[str, torch.Tensor] = {}
    if files:
        for fn in files:
            state.update(load_file(fn))
    else:
        files = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
        if not files:
            raise FileNotFoundError(f"hf_dir {hf_dir}: no *.safetensors or pytorch_model*.bin weights")
        for fn in files:
            state.update(torch.load(fn, map_location="cpu", weights_only=True))
    return state, hf_config


def convert_hf_to_checkpoint(
    hf_dir: str,
    save_dir: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    iteration: int = 0,
    patch_method: Optional[str] = None,
    **overrides,
) -> ModelConfig:
    """Convert the HF folder `hf_dir` into a megatron checkpoint under `save_dir`.

    `overrides` replace ModelConfig fields (num_latent_thoughts, scale_embeddings, ...): latent
    thoughts change the forward, not the weights. `patch_method`: the authors' --patch_method the
    folder was trained with (their config.json does not say; see hf/authors.py). Runs in this
    process as a world of one.
    """
    state, hf_config = read_hf_folder(hf_dir)
    if patch_method is not None:
        hf_config.patch_method = patch_method
    ParallelLayout(tensor_model_parallel_size, pipeline_model_parallel_size).check_model(
        config_from_hf(hf_config, **overrides))
    cfg, full = hf_to_megatron(state, hf_config, **overrides)
    del state
    initialize_single_process("convert_hf_to_checkpoint")
    model = build_gpt_model(cfg)
    load_full_into_model(model, full, cfg)
    del full
    save_checkpoint(
        save_dir, iteration, [model],
        extra={"model_config": cfg.to_dict(), "converted_from": os.path.abspath(hf_dir),
               "intended_layout": {"tensor_model_parallel_size": tensor_model_parallel_size,
                                   "pipeline_model_parallel_size": pipeline_model_parallel_size}},
        root_files={MODEL_CONFIG_FILE: model_config_text(cfg)},
    )
    return cfg
