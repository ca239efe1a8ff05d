"""Run a test body on several CPU processes (gloo), the way torchrun would.

``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes, joins them into one gloo
process group (rendezvous through a file, so no port can be taken by someone else), calls
``fn(*args)`` on each and returns the per-rank return values. ``fn`` must be a module-level
function (it is pickled by reference). When a rank raises, the others are killed and the test
fails with that rank's traceback; a run past ``timeout`` seconds fails naming the ranks still
running, instead of hanging the suite.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

import torch


def _worker(rank, world_size, init_file, fn, args, results, environ):
    # A forked rank inherits the fork server's environment: take the test's, as spawn would.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        import torch.distributed as dist

        from megatron_latent.platform import install_cpu_backend

        install_cpu_backend()  # before any megatron code

        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        try:
            out = fn(*args)
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        # Tensors would travel as shared-memory handles that die with this process: send bytes.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001  (report everything, including SystemExit)
        results.put((rank, "error", traceback.format_exc()))


def _context():
    """Ranks fork from one server process that imported torch and megatron-core once for the
    session: a spawned rank spends about 4 s of CPU importing them, and the suite starts a few
    hundred ranks. Otherwise a rank starts as a spawned one would: the server holds no threads,
    no process group, no CPU backend and no CUDA state, and the rank takes the test's sys.path
    and environment."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "megatron.core", "megatron_latent.platform"])
    return ctx


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            # Not daemonic: megatron's checkpoint writer starts processes of its own.
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results, dict(os.environ)))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs, deadline, failure = {}, time.monotonic() + timeout, None
        try:
            while len(outputs) < world_size and failure is None:
                try:
                    rank, status, payload = results.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        waiting = sorted(set(range(world_size)) - set(outputs))
                        failure = f"timed out after {timeout:.0f}s; ranks still running: {waiting}"
                    else:
                        dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                        if dead:
                            failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    continue
                if status == "ok":
                    outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    failure = f"rank {rank} of {world_size} failed:\n{payload}"
        finally:
            for p in procs:
                if failure is not None and p.is_alive():
                    p.kill()
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        if failure is not None:
            raise AssertionError(failure)
    return [outputs[r] for r in range(world_size)]
