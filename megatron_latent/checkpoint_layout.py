"""What a checkpoint directory holds and how to read its model, below training and export.

    <root>/iter_0000100/                      a dist_checkpointing directory (torch_dist format)
    <root>/latest_checkpointed_iteration.txt  the newest complete iteration
    <root>/model_config.json                  the newest iteration's ModelConfig
    <root>/iter_0000100.tmp/                  an iteration being written (never read)
    <root>/iter_0000050.deleting/             an iteration being deleted by retention (never read)

An iteration directory holds `.metadata` (torch.distributed.checkpoint's index of the tensor
shards), `__<rank>_<n>.distcp` (the shards), `common.pt` (the plain state: iteration, scheduler,
`extra`) and `metadata.json` (megatron's backend names). `check_iteration` verifies that these
exist and that every shard file is as long as the index says, on every rank alike, before a load.

training/checkpointing.py writes this layout (with optimizer state); generation, export and
conversion read it through this module, which imports nothing of the package but the config.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Dict, List, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from megatron_latent.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"
_ITERATION_NAME = re.compile(r"iter_(\d{7,})")


class CheckpointError(ValueError):
    """A damaged checkpoint directory (tracker, iteration, file); the message names the file."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def complete_iterations(root: str) -> List[int]:
    """The iterations under `root` that were completely written (renamed from `.tmp`), ascending."""
    if not os.path.isdir(root):
        return []
    found = (_ITERATION_NAME.fullmatch(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0))))


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker names, or None when there is no tracker. CheckpointError when it
    holds anything but a non-negative number."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    text = raw.decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r} "
                              "(a damaged tracker; write the newest complete iteration's number into it)")
    return int(text)


def find_resume_iteration(load_dir: str):
    """(iteration, warning) of the checkpoint a resumed run loads: the tracker's, which must
    exist, or, without a tracker, the newest complete iteration (with a warning saying so);
    (None, None) when `load_dir` holds no checkpoint at all."""
    iteration = read_latest_iteration(load_dir)
    if iteration is not None:
        if not os.path.isdir(iteration_dir(load_dir, iteration)):
            present = complete_iterations(load_dir)
            raise CheckpointError(
                f"{os.path.join(load_dir, TRACKER)}: names iteration {iteration}, but "
                f"{iteration_dir(load_dir, iteration)} does not exist (complete iterations there: "
                f"{_listing(present)}); write one of them into it")
        return iteration, None
    present = complete_iterations(load_dir)
    if not present:
        return None, None
    return present[-1], (f"load_dir {load_dir}: no {TRACKER}, but iterations {_listing(present)} are there: resuming "
                         f"from the newest, {present[-1]}")


def _listing(iterations: List[int]) -> str:
    if not iterations:
        return "none"
    shown = [str(i) for i in iterations[-5:]]
    return ", ".join((["..."] if len(iterations) > 5 else []) + shown)


def check_iteration(root: str, iteration: int) -> None:
    """CheckpointError naming the file when iteration `iteration` is incomplete or damaged: its
    metadata.json, `.metadata` or `common.pt` missing or unreadable, or a shard file missing or
    shorter than the index says. Reads the small files only; the same answer on every rank."""
    path = iteration_dir(root, iteration)

    def bad(name, what):
        return CheckpointError(f"checkpoint of iteration {iteration}: {os.path.join(path, name)} {what}; "
                               f"{_fallback_hint(root, iteration)}")

    for name in ("metadata.json", ".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise bad(name, "is missing")
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad("metadata.json", f"is unreadable ({e})") from None
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            storage = pickle.load(f).storage_data
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a damaged index)
        raise bad(".metadata", f"is unreadable ({type(e).__name__}: {e})") from None
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise bad(name, "is missing")
        if os.path.getsize(file) < size:
            raise bad(name, f"is truncated ({os.path.getsize(file)} bytes, the index needs {size})")
    try:
        torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to read it means a damaged file)
        raise bad("common.pt", f"is unreadable ({type(e).__name__}: {e})") from None


def _fallback_hint(root: str, iteration: int) -> str:
    older = [i for i in complete_iterations(root) if i < iteration]
    if not older:
        return "no older checkpoint is there"
    return (f"to resume from the previous one, move {os.path.basename(iteration_dir(root, iteration))} aside and "
            f"write {older[-1]} into {TRACKER}")


def resolve_iteration(load_dir: str, iteration: Optional[int] = None) -> int:
    """`iteration`, or the latest complete one, checked to exist; FileNotFoundError names the directory or
    iteration (CheckpointError, a ValueError, for a damaged tracker)."""
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"load_dir {load_dir}: no such directory")
    if iteration is None:
        iteration, _ = find_resume_iteration(load_dir)
        if iteration is None:
            raise FileNotFoundError(f"load_dir {load_dir}: no {TRACKER} (no complete checkpoint there)")
    if not os.path.isdir(iteration_dir(load_dir, iteration)):
        raise FileNotFoundError(f"iteration={iteration}: {iteration_dir(load_dir, iteration)} does not exist")
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


def read_model_config(load_dir: str) -> ModelConfig:
    """The ModelConfig of `load_dir`/model_config.json (the newest iteration's)."""
    path = os.path.join(load_dir, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_dir {load_dir}: no {MODEL_CONFIG_FILE} there")
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
