"""Checkpoints in megatron's layout, written with megatron-core `dist_checkpointing`.

On disk (the same on GPU and CPU, and loadable at a different TP/PP layout):

    <save>/iter_0000100/                      a dist_checkpointing directory (torch_dist format)
    <save>/latest_checkpointed_iteration.txt  the newest complete iteration

An iteration is written under a temporary name and renamed when every rank has finished, and the
`latest` file is replaced last, so an interrupted save never leaves a checkpoint that looks
complete and never loses the previous one.

Scripts that save must guard their entry point with ``if __name__ == "__main__":``: megatron's
filesystem writer starts helper processes with the spawn method, which re-imports ``__main__``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """The newest complete iteration under `root`, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}") from None


def _model_sharded_state_dict(model_chunks) -> Dict[str, Any]:
    sd = {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        module = chunk.module if hasattr(chunk, "module") else chunk
        sd[key] = module.sharded_state_dict()
    return sd


def _flat_model_sharded(sd: Dict[str, Any]) -> Dict[str, Any]:
    flat = {}
    for k, v in sd.items():
        if k.startswith("model"):
            flat.update(v)
    return flat


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Save model (and optimizer, scheduler, `extra` plain state) as iteration `iteration`."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(_flat_model_sharded(sd))
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["extra"] = extra or {}
    dist_checkpointing.save(sd, tmp)
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        tracker = os.path.join(root, TRACKER)
        with open(tracker + ".tmp", "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tracker + ".tmp", tracker)
    _barrier()
    return final


def load_checkpoint(
    root: str,
    model_chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
) -> Dict[str, Any]:
    """Load iteration `iteration` (default: the latest) into the model (and optimizer, scheduler).

    Returns {"iteration": int, "extra": dict}.
    """
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"--load {root}: no {TRACKER} (no complete checkpoint there)")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {root}: checkpoint directory {path} does not exist")

    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(_flat_model_sharded(sd), is_loading=True)
    loaded = dist_checkpointing.load(sd, path)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        module = chunk.module if hasattr(chunk, "module") else chunk
        module.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return {"iteration": int(loaded["iteration"]), "extra": loaded.get("extra", {})}


def _barrier():
    if dist.is_initialized():
        dist.barrier()
