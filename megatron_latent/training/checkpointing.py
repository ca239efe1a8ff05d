"""Checkpoints in megatron's layout, written with megatron-core `dist_checkpointing`.

On disk (the same on GPU and CPU, and loadable at a different TP/PP layout): checkpoint_layout.py.

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
from megatron.core import dist_checkpointing

from megatron_latent import compat, platform

# read_latest_iteration, read_common, checkpoint_model_config: re-exported for the training loop.
from megatron_latent.checkpoint_layout import (  # noqa: F401
    TRACKER,
    checkpoint_model_config,
    iteration_dir,
    load_model_state,
    model_sharded_state_dict,
    read_common,
    read_latest_iteration,
    resolve_iteration,
)

# The distributed optimizer's state is saved as Megatron-LM saves it by default: per gradient
# bucket, written by every rank in parallel, reshardable over DP only (the run resumes at the same
# TP and PP). megatron-core 0.16.1's layout-free `fully_reshardable` form fails to load into
# torch's Adam (it expects a per-parameter `step` the checkpoint lacks).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_sharded_state_dict(optimizer, model_sd: Dict[str, Any], is_loading: bool):
    if is_loading:
        compat.materialize_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(_flat_model_sharded(model_sd), is_loading=is_loading,
                                        metadata=_OPTIMIZER_METADATA)


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
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"

    def prepare():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    _on_rank0(prepare, f"--save {root}")

    sd = model_sharded_state_dict(model_chunks)
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
    # Started already: do not open the window in which a SIGTERM is dropped again at every save.
    if compat.writer_queue_started() or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        compat.start_writer_queue()
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
    path = iteration_dir(root, resolve_iteration(root, iteration))

    sd = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, sd, is_loading=True)
    loaded = dist_checkpointing.load(sd, path)
    load_model_state(model_chunks, loaded)
    if optimizer is not None:
        # no_grad: the distributed optimizer copies into shards that view the model's parameters.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        compat.restore_adam_steps(optimizer)
        platform.fuse_optimizer(optimizer)
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return {"iteration": int(loaded["iteration"]), "extra": loaded.get("extra", {})}


def _barrier():
    if dist.is_initialized():
        dist.barrier()
