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
import logging
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_latent import compat, platform

# read_latest_iteration, read_common, checkpoint_model_config: re-exported for the training loop.
from megatron_latent.checkpoint_layout import (  # noqa: F401
    TRACKER,
    CheckpointError,
    check_iteration,
    checkpoint_model_config,
    complete_iterations,
    find_resume_iteration,
    iteration_dir,
    load_model_state,
    model_sharded_state_dict,
    read_common,
    read_latest_iteration,
    resolve_iteration,
)

logger = logging.getLogger(__name__)

# The distributed optimizer's state is saved in model space (megatron-core's `fully_reshardable`,
# Megatron-LM's --dist-ckpt-optim-fully-reshardable): the DP shards are gathered and every
# parameter's fp32 weight and Adam moments are written as tensors shaped like that parameter, TP
# and PP shards written by their own ranks, so the state loads at any TP, PP, VPP and DP.
# Checkpoints of the bucket format (`dp_reshardable`, DP only) are read in the format they hold.
# (megatron-core 0.16.1's `fully_sharded_model_space` is unusable: it needs flattened ranges.)
FULLY_RESHARDABLE = "fully_reshardable"


def optimizer_sharding(common: Dict[str, Any]) -> Optional[str]:
    """How a checkpoint's distributed-optimizer state is laid out (None: another optimizer)."""
    optim = common.get("optimizer")
    return optim.get("param_state_sharding_type") if isinstance(optim, dict) else None


def _optimizer_sharded_state_dict(optimizer, model_sd: Dict[str, Any], is_loading: bool,
                                  sharding: Optional[str] = None):
    if is_loading:
        compat.materialize_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(_flat_model_sharded(model_sd), is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": sharding or FULLY_RESHARDABLE})


def _flat_model_sharded(sd: Dict[str, Any]) -> Dict[str, Any]:
    flat = {}
    for k, v in sd.items():
        if k.startswith("model"):
            flat.update(v)
    return flat


@dataclass(frozen=True)
class Retention:
    """Which complete iterations survive a save. Default: all. `keep_last` K keeps the newest K,
    `retain_interval` R every multiple of R (Megatron-LM's --save-retain-interval; given alone it
    keeps the newest one besides), and `keep_iterations` are never deleted. The iteration the
    tracker names is always kept; iterations still being written (`.tmp`) are never counted."""

    keep_last: Optional[int] = None
    retain_interval: Optional[int] = None
    keep_iterations: FrozenSet[int] = frozenset()

    def to_delete(self, iterations: List[int], tracker: Optional[int]) -> List[int]:
        if self.keep_last is None and self.retain_interval is None:
            return []
        newest = set(sorted(iterations)[-(self.keep_last or 1):])
        keep = newest | set(self.keep_iterations) | {tracker}
        return [i for i in sorted(iterations)
                if i not in keep and not (self.retain_interval and i % self.retain_interval == 0)]


_DELETING = ".deleting"


def prune_checkpoints(root: str, retention: Retention) -> List[int]:
    """Delete the iterations `retention` does not keep; returns them. Each is first renamed out of
    the `iter_*` namespace (atomic), then removed, so a kill during the removal leaves a leftover
    `iter_*.deleting` (removed by the next prune), never a half-deleted iteration that looks
    complete. Run it only after the newest iteration is published (the tracker names it)."""
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(_DELETING):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    deleted = retention.to_delete(complete_iterations(root), read_latest_iteration(root))
    for i in deleted:
        trash = iteration_dir(root, i) + _DELETING
        os.rename(iteration_dir(root, i), trash)
        shutil.rmtree(trash)
    return deleted


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    extra: Optional[Dict[str, Any]] = None,
    root_files: Optional[Dict[str, str]] = None,
    retention: Optional[Retention] = None,
    background: Optional["BackgroundSaves"] = None,
) -> str:
    """Save model (and optimizer, scheduler, `extra` plain state) as iteration `iteration` in `root`
    (the save_dir its errors name).

    `root_files` (name -> text) are written beside the iterations once this one is complete and
    before `latest` points at it (model_config.json: the newest iteration's model). Then, with
    `retention`, older iterations it does not keep are deleted (and logged). Before writing, the
    free space is compared with the previous save's size; a failed write (a full disk) raises
    CheckpointWriteError with the OS's words and leaves the older checkpoints as they were.
    With `background`, the write goes on in a forked process after this returns and is published
    later (BackgroundSaves); a save still in flight is completed first."""
    if background is not None:
        background.wait()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    needed = _estimated_size(root, model_chunks, optimizer)

    def prepare():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        if free < needed:
            raise CheckpointWriteError(
                f"not enough free space for iteration {iteration}: {free / 1e9:.3g} GB free, a checkpoint takes "
                f"about {needed / 1e9:.3g} GB (the newest one's size, or the model and optimizer's); nothing was "
                "written: free space (or keep fewer: keep_last)")
        os.makedirs(tmp)

    _on_rank0(prepare, f"save_dir {root}")

    sd = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, sd, is_loading=False)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["extra"] = extra or {}
    start_checkpoint_writer()

    def publish():
        _publish(root, iteration, tmp, root_files, retention, background is not None)

    try:
        # The writer processes forked here inherit the blocked SIGTERM: a scheduler's SIGTERM to
        # the whole job does not kill them mid-write.
        with _sigterm_deferred():
            if background is None:
                dist_checkpointing.save(sd, tmp)
            else:
                request = dist_checkpointing.save(sd, tmp, async_sharded_save=True)
                request.add_finalize_fn(publish)  # after megatron's own (its .metadata), on every rank
                background.queue.schedule_async_request(request)
                background.pending = (root, iteration, tmp)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (raised on every rank; rank 0 has the cause)
        _raise_write_error(root, iteration, tmp, e)
    if background is None:
        _barrier()
        publish()
    return final


def _publish(root, iteration, tmp, root_files, retention, background: bool) -> None:
    """Every rank has written iteration `iteration` to `tmp`: rank 0 renames it, writes the root
    files and then the tracker, and prunes what `retention` does not keep (logged)."""
    deleted: List[int] = []

    def publish():
        final = iteration_dir(root, iteration)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for name, text in (root_files or {}).items():
            _write_atomically(os.path.join(root, name), text)
        _write_atomically(os.path.join(root, TRACKER), f"{iteration}\n")
        if retention is not None:
            deleted.extend(prune_checkpoints(root, retention))

    _on_rank0(publish, f"save_dir {root}")
    if background:
        logger.info(f"the checkpoint of iteration {iteration} in {root} is complete")
    if retention is not None:
        deleted = _from_rank0(deleted)
        if deleted:
            logger.info(f"deleted the checkpoints of iterations {', '.join(map(str, deleted))} from {root} "
                        "(retention: keep_last / retain_interval)")


class BackgroundSaves:
    """Checkpoints written while training goes on (--async-save), with megatron-core's async
    dist_checkpointing: save_checkpoint gathers the state, forks a writer process (which sees the
    state as it was at the fork) and returns; once every rank's writer has finished, the
    iteration is published (renamed, tracker replaced) by `poll` or `wait`, which every rank
    calls at the same points. One save is in flight at a time: the next save, the end of the run,
    --exit-interval and SIGTERM wait for it."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        self.pending = None  # (root, iteration, tmp) of the save in flight

    def poll(self) -> None:
        """Publish the save in flight if every rank has finished writing it (one all-reduce)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight is written and published."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self.pending is None:
            return
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (raised on every rank)
            root, iteration, tmp = self.pending
            self.pending = None
            _raise_write_error(root, iteration, tmp, e)
        if not self.queue.get_num_unfinalized_calls():
            self.pending = None


def check_save_dir(save_dir: str, start_iteration: int, resumed_here: bool) -> None:
    """`save_dir` holding iterations past the one this run starts from: its saves would overwrite
    them. CheckpointError unless the run resumed from `save_dir` itself (`resumed_here`): e.g. a
    fresh start beside a run whose tracker was lost, or a save_dir without a load_dir. A run that
    resumed here replaces them as it reaches them (an iteration renamed into place by a save that
    was killed before it replaced the tracker), with a warning."""
    newer = [i for i in complete_iterations(save_dir) if i > start_iteration]
    if not newer:
        return
    listing = ", ".join(map(str, newer[-5:]))
    if not resumed_here:
        raise CheckpointError(
            f"save_dir {save_dir}: holds iterations {listing} past this run's start ({start_iteration}), which "
            f"its saves would overwrite; resume them with load_dir {save_dir}, or save elsewhere")
    logger.warning(f"save_dir {save_dir}: iterations {listing} are past the tracker's ({start_iteration}); this run "
                   "replaces them as it reaches them")


def _estimated_size(root: str, model_chunks, optimizer) -> int:
    """Bytes the next save needs: the newest complete iteration's size, or, for the first save,
    every parameter once (DP replicas counted once) at its width plus the fp32 main weight and
    Adam's two moments when there is an optimizer. Known on every rank (one all-reduce)."""
    done = complete_iterations(root)
    if done:
        path = iteration_dir(root, done[-1])
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    from megatron.core import parallel_state as ps

    size = 0
    if not dist.is_initialized() or ps.get_data_parallel_rank() == 0:
        for chunk in model_chunks:
            for p in chunk.parameters():
                size += p.numel() * (p.element_size() + (12 if optimizer is not None else 0))
    if dist.is_initialized():
        t = torch.tensor([size], dtype=torch.float64, device=platform.device())
        dist.all_reduce(t)
        size = int(t.item())
    return size


def _raise_write_error(root: str, iteration: int, tmp: str, error: BaseException):
    """One line for a failed dist_checkpointing.save on every rank: rank 0's cause (the OS's
    words where there are some), the partial directory removed, older checkpoints named."""
    message = _cause_text(error)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    message = _from_rank0(message)
    kept = read_latest_iteration(root) if os.path.isdir(root) else None
    raise CheckpointWriteError(
        f"save_dir {root}: writing iteration {iteration} failed: {message}; "
        + (f"the newest complete checkpoint, iteration {kept}, is intact" if kept is not None
           else "no earlier checkpoint was there")) from error


def _cause_text(error: BaseException) -> str:
    """The OS's words behind a failed save ("No space left on device (path)"), found through the
    causes and torch's CheckpointException, whose per-rank failures arrive pickled (their causes
    lost, their messages kept); else the first line of the innermost failure."""
    seen, todo = [], [error]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if e is None or any(e is x for x in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f" ({e.filename})" if e.filename else "")
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__] + [
            f[0] if isinstance(f, tuple) else f for f in (failures.values() if isinstance(failures, dict) else [])]
    for e in reversed(seen):
        found = re.search(r"\[Errno \d+\] ([^\n]*)", str(e))
        if found:
            return found.group(1)
    return (str(seen[-1]).strip().splitlines() or [type(seen[-1]).__name__])[0]


def _from_rank0(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    iteration = resolve_iteration(root, iteration)
    path = iteration_dir(root, iteration)

    sd = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, sd, is_loading=True,
                                                        sharding=optimizer_sharding(read_common(root, iteration)))
    loaded = dist_checkpointing.load(sd, path)
    load_model_state(model_chunks, loaded)
    if optimizer is not None:
        # no_grad: the distributed optimizer copies into shards that view the model's parameters.
        with torch.no_grad():
            compat.load_optimizer_state(optimizer, loaded["optimizer"], keep_lr_bounds=bool(
                scheduler is not None and scheduler.override_opt_param_scheduler))
        compat.restore_adam_steps(optimizer)
        platform.fuse_optimizer(optimizer)
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return {"iteration": int(loaded["iteration"]), "extra": loaded.get("extra", {})}


def _barrier():
    if dist.is_initialized():
        dist.barrier()
