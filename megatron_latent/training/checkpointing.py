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

import contextlib
import os
import shutil
import signal
import threading
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


# The distributed optimizer's state is saved as Megatron-LM saves it by default: per gradient
# bucket, written by every rank in parallel, reshardable over DP only (the run resumes at the same
# TP and PP). megatron-core 0.16.1's layout-free `fully_reshardable` form fails to load into
# torch's Adam (it expects a per-parameter `step` the checkpoint lacks).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_sharded_state_dict(optimizer, model_sd: Dict[str, Any], is_loading: bool):
    if is_loading:
        _materialize_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(_flat_model_sharded(model_sd), is_loading=is_loading,
                                        metadata=_OPTIMIZER_METADATA)


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam allocates its state (and `step`) at the first step; the distributed optimizer's
    load needs it allocated before the checkpoint is read into it. A step with zero gradients does
    that; whatever it does to the weights is overwritten by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and inner is not None and not inner.state:
            init()


def _restore_adam_steps(optimizer) -> None:
    """The distributed optimizer's load sets torch Adam's per-parameter `step` from the param
    groups and then copies the bucket state over it, which holds the placeholder step of
    `_materialize_optimizer_state`; the groups keep the true one (megatron-core 0.16.1, torch
    Adam; Transformer Engine's and Apex's Adam keep the step in the groups only)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


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
    root_files: Optional[Dict[str, str]] = None,
) -> str:
    """Save model (and optimizer, scheduler, `extra` plain state) as iteration `iteration`.

    `root_files` (name -> text) are written beside the iterations once this one is complete and
    before `latest` points at it (model_config.json: the newest iteration's model)."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"

    def prepare():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    _on_rank0(prepare, f"--save {root}")

    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, sd, is_loading=False)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["extra"] = extra or {}
    start_checkpoint_writer()
    with _sigterm_deferred():
        dist_checkpointing.save(sd, tmp)
    _barrier()

    def publish():
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for name, text in (root_files or {}).items():
            _write_atomically(os.path.join(root, name), text)
        _write_atomically(os.path.join(root, TRACKER), f"{iteration}\n")

    _on_rank0(publish, f"--save {root}")
    return final


# Schedulers (SLURM, torchrun's agent) send SIGTERM to every process of a job, and megatron's
# checkpoint writer works through helper processes: a queue server it spawns once and keeps, and
# writers it forks for each save. Killed, they take the save (and --exit-signal-handler's last
# save) down with them. The server is started ignoring SIGTERM (a spawned process keeps only an
# ignored disposition); the forked writers inherit the blocked mask of the save.


def start_checkpoint_writer() -> None:
    """Start megatron's writer queue server now, immune to SIGTERM. Idempotent; save_checkpoint
    calls it, and a driver calls it before it installs its own SIGTERM handler, since a SIGTERM
    that arrives during these few hundred milliseconds is dropped."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Started already: do not open the window in which a SIGTERM is dropped again at every save.
    if filesystem_async._results_queue is not None or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigterm_deferred():
    """SIGTERM is held back while a checkpoint is written and delivered once it is complete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _on_rank0(fn, what: str) -> None:
    """Run `fn` on rank 0 and let every rank learn whether it worked: a failed write (disk full,
    no permission) stops all ranks with the error instead of leaving the others in a barrier."""
    from megatron_latent import platform

    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fn()
        except OSError as e:
            error = e
    if dist.is_initialized():
        failed = torch.tensor([int(error is not None)], device=platform.device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise CheckpointWriteError(f"{what}: rank 0 could not write the checkpoint (its error says why)")
    if error is not None:
        raise CheckpointWriteError(f"{what}: {error}") from error


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous complete one is untouched."""


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

    path = iteration_dir(root, resolve_iteration(root, iteration))

    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, sd, is_loading=True)
    loaded = dist_checkpointing.load(sd, path)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        module = chunk.module if hasattr(chunk, "module") else chunk
        module.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        # no_grad: the distributed optimizer copies into shards that view the model's parameters.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return {"iteration": int(loaded["iteration"]), "extra": loaded.get("extra", {})}


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


def read_common(root: str, iteration: int) -> Dict[str, Any]:
    """The plain (non-tensor) part of a checkpoint: iteration, extra, scheduler state."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))


def checkpoint_model_config(root: str, iteration: int, common: Optional[Dict[str, Any]] = None):
    """The ModelConfig iteration `iteration` was saved with: its own copy in `extra`, else (older
    checkpoints) the directory's model_config.json, which describes the newest iteration.
    `common`: the iteration's read_common, when the caller has it already."""
    from megatron_latent.config import ModelConfig
    from megatron_latent.hf.convert import load_config

    if common is None:
        common = read_common(root, iteration)
    saved = common.get("extra", {}).get("model_config")
    return ModelConfig.from_dict(saved) if saved is not None else load_config(root)


def load_single_process(root: str, iteration: Optional[int], build_model):
    """(model, ModelConfig, iteration): `build_model(cfg)` filled from checkpoint `root`, in this
    process as a world of one (TP=PP=1; a process group is started when none exists). Checkpoints
    hold global shapes, so one saved at any TP/PP layout loads here. For export and generation."""
    import megatron_latent  # noqa: F401  (CPU backend when CUDA is absent)
    from megatron_latent.parallel.initialize import initialize_single_process

    # Checked before any process group or model exists, so a wrong path fails at once.
    iteration = resolve_iteration(root, iteration)
    cfg = checkpoint_model_config(root, iteration)
    initialize_single_process("loading a checkpoint for export or generation")
    model = build_model(cfg)
    load_checkpoint(root, [model], iteration=iteration)
    return model, cfg, iteration


def _barrier():
    if dist.is_initialized():
        dist.barrier()
