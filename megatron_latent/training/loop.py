"""The training loop: resume from a checkpoint, then steps with logging, validation and saving.

Free of flag parsing: `pretrain.py` builds the model, optimizer, scheduler and data iterators and
hands them to `train` with a `LoopConfig`. Steps and validation run through
`parallel.pipeline` (latent_train_step / latent_eval_loss), which covers every layout: at PP=1 the
model's own multi-pass forward, at PP>1 the passes as weight-shared virtual pipeline chunks.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_latent.training import batches as batching
from megatron_latent.training import checkpointing


# ------------------------------------------------------------------------------ resume
@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with these flags; the message names the flag."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops before it saves anything."""


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)


# Scheduler settings a resumed run compares with its checkpoint, and the flags that set them.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-fraction",
    "lr_decay_steps": "--train-iters", "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
}
# Latent settings that change what the weights compute: a run does not silently switch them.
_LATENT_FLAGS = {"num_latent_thoughts": "--num-latent-thoughts", "scale_embeddings": "--scale-embeddings"}


def resume(load_dir: str, cfg, model_chunks, optimizer, scheduler, finetune: bool = False,
           load_optim: bool = True, optimizer_layout: Optional[dict] = None, log=print) -> TrainState:
    """Load the latest checkpoint under `load_dir` into the model (and optimizer and scheduler).

    No checkpoint there: a fresh start (the usual `--load X --save X` preemption setup), unless
    `finetune`, which needs weights. The checkpoint's model must have the same weights as `cfg`.
    Its latent settings may differ only with `finetune` (continued pretraining of a vanilla model
    with thoughts is a new run); its lr schedule may differ only when the scheduler was built to
    override it or to take the checkpoint's (Megatron's two flags). `optimizer_layout` (the
    run's tensor_model_parallel_size, pipeline_model_parallel_size, use_distributed_optimizer) is
    checked against the checkpoint's: distributed-optimizer state reshards over DP only."""
    iteration = checkpointing.read_latest_iteration(load_dir)
    if iteration is None:
        if finetune:
            raise ResumeError(f"--finetune: no checkpoint in --load {load_dir}")
        log(f"no checkpoint in --load {load_dir}: starting from scratch")
        return TrainState()
    common = checkpointing.read_common(load_dir, iteration)
    saved = checkpointing.checkpoint_model_config(load_dir, iteration, common)
    mismatches = cfg.weight_mismatches(saved)
    if mismatches:
        raise ResumeError(
            f"--load {load_dir}: the checkpoint's model differs from the flags' "
            f"(checkpoint vs flags) in {'; '.join(mismatches)}"
        )
    changed = [f"{flag} {getattr(saved, f)} -> {getattr(cfg, f)}"
               for f, flag in _LATENT_FLAGS.items() if getattr(saved, f) != getattr(cfg, f)]
    if changed and not finetune:
        raise ResumeError(
            f"--load {load_dir}: iteration {iteration} was trained with other latent settings "
            f"({', '.join(changed)}); continuing it with new ones is a new run: pass --finetune"
        )
    with_optim = load_optim and not finetune
    if with_optim and "opt_param_scheduler" not in common:
        raise ResumeError(
            f"--load {load_dir}: iteration {iteration} holds weights only (no optimizer state, e.g. "
            "converted from Hugging Face); pass --finetune (or --no-load-optim)"
        )
    if with_optim and optimizer_layout:
        _check_optimizer_layout(load_dir, common.get("extra", {}).get("args", {}), optimizer_layout)
    if with_optim and not (scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler):
        ours, theirs = scheduler.state_dict(), common["opt_param_scheduler"]
        differ = sorted({f"{_SCHEDULE_FLAGS[k]} ({k} {theirs[k]} vs {ours[k]})"
                         for k in _SCHEDULE_FLAGS if k in theirs and theirs[k] != ours[k]})
        if differ:
            raise ResumeError(
                f"--load {load_dir}: the lr schedule differs from the checkpoint's (checkpoint vs flags) in "
                f"{'; '.join(differ)}; pass --override-opt_param-scheduler to follow the flags or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )
    if saved.jacobi_iters != cfg.jacobi_iters or saved.jacobi_iters_eval != cfg.jacobi_iters_eval:
        log(f"note: Jacobi iterations change from training {tuple(saved.jacobi_iters)} / eval "
            f"{saved.jacobi_iters_eval} to {tuple(cfg.jacobi_iters)} / {cfg.jacobi_iters_eval}")
    info = checkpointing.load_checkpoint(
        load_dir, model_chunks, optimizer if with_optim else None, scheduler if with_optim else None,
        iteration=iteration,
    )
    if not with_optim:  # --finetune or --no-load-optim
        # The optimizer's fp32 main weights were copied from the initial weights when it was built;
        # with bf16 they, not the loaded model weights, would be stepped and copied back.
        optimizer.reload_model_params()
        if finetune:
            log(f"loaded weights of iteration {iteration} from {load_dir} (--finetune: training starts at 0)")
            return TrainState()
        # Fresh Adam moments, but the lr where the schedule is at this iteration.
        scheduler.step(increment=iteration)
        log(f"--no-load-optim: optimizer state starts fresh; the lr schedule continues at iteration {iteration}")
    extra = info["extra"]
    log(f"resumed from {load_dir} at iteration {iteration}")
    return TrainState(iteration, int(extra.get("consumed_train_samples", 0)))


def _check_optimizer_layout(load_dir: str, saved: dict, now: dict) -> None:
    if not saved:
        return  # saved by an older driver: megatron's own checks apply
    flags = lambda d: " ".join(
        ["--use-distributed-optimizer"] * bool(d.get("use_distributed_optimizer"))
        + [f"--tensor-model-parallel-size {d.get('tensor_model_parallel_size')}",
           f"--pipeline-model-parallel-size {d.get('pipeline_model_parallel_size')}"]
        + ["--bf16"] * bool(d.get("bf16"))
        + [f"--num-virtual-stages-per-pipeline-rank {d['num_virtual_stages_per_pipeline_rank']}"]
        * bool(d.get("num_virtual_stages_per_pipeline_rank")))
    distributed = bool(saved.get("use_distributed_optimizer")), bool(now["use_distributed_optimizer"])
    # Its buckets are keyed by TP/PP rank, gradient-buffer dtype and model chunk.
    layout = lambda d: (d.get("tensor_model_parallel_size"), d.get("pipeline_model_parallel_size"),
                        bool(d.get("bf16")), d.get("num_virtual_stages_per_pipeline_rank") or 1)
    if distributed[0] != distributed[1] or (distributed[0] and layout(saved) != layout(now)):
        raise ResumeError(
            f"--load {load_dir}: its optimizer state was saved with {flags(saved)} and cannot be read with "
            f"{flags(now)} (distributed-optimizer state reshards over data parallelism only); resume with "
            "the checkpoint's settings, or pass --no-load-optim to start the Adam moments fresh")


# ------------------------------------------------------------------------------ the loop
@dataclass
class LoopConfig:
    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    num_microbatches: int
    seq_length: int
    log_interval: int = 1
    eval_interval: int = 1000
    eval_iters: int = 0
    save: Optional[str] = None
    load: Optional[str] = None  # where the resumed checkpoint came from (named in error messages)
    save_interval: Optional[int] = None
    exit_signal_handler: bool = False
    exit_interval: Optional[int] = None
    flops_per_sample: Optional[Callable[[int], float]] = None  # J -> model FLOPs of one sample


class _SignalFlag:
    """SIGTERM sets a flag; the loop agrees on it over all ranks at the end of each step."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.received = True



def _any_rank(*flags: bool) -> List[bool]:
    """Each flag, True on every rank when it is True on any: one all-reduce for all of them (on
    the current device: NCCL needs CUDA)."""
    from megatron_latent import platform

    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def train(loop: LoopConfig, state: TrainState, model_chunks, optimizer, scheduler,
          train_iter: Iterator[dict], valid_batches: Optional[List[dict]], test_batches: Optional[List[dict]],
          jacobi_for_step: Callable[[int], Optional[int]], jacobi_eval: Optional[int],
          save_fn: Callable[[TrainState], None], metrics, log, reporter: bool) -> TrainState:
    """Run steps state.iteration+1 .. train_iters; returns the final state.

    `jacobi_for_step(step)` is the step's J (drawn from the seed and the step alone, so a resumed
    run draws what the uninterrupted run would have). `save_fn(state)` writes a checkpoint.
    Raises TrainingDiverged at a non-finite loss or gradient norm, before anything is saved."""
    from megatron_latent.training.metrics import peak_flops

    world = dist.get_world_size() if dist.is_initialized() else 1
    peak = peak_flops()
    signals = _SignalFlag(loop.exit_signal_handler)
    first_step = state.iteration + 1
    last_saved = state.iteration
    last_checkpoint = (loop.load, state.iteration) if loop.load and state.iteration else None
    window_time, window_flops, window_steps = 0.0, 0.0, 0

    from megatron_latent.parallel.pipeline import latent_eval_loss, latent_train_step

    def run_eval(step, batches, name="validation", key="valid/loss"):
        if not batches:
            return
        # Evaluation batches wait on the host; each is moved to the device when it is used.
        loss = latent_eval_loss(model_chunks, (batching.to_device(b) for b in batches), len(batches),
                                loop.seq_length, loop.micro_batch_size, jacobi_eval)
        if reporter and loss is not None:
            log(f"{name} at iteration {step} | loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.3f}")
            metrics.write(step, {key: loss})

    while state.iteration < loop.train_iters:
        step = state.iteration + 1
        t0 = time.perf_counter()
        jacobi = jacobi_for_step(step)
        micro = batching.take(train_iter, loop.num_microbatches)
        result = latent_train_step(model_chunks, optimizer, iter(micro), loop.num_microbatches,
                                   loop.seq_length, loop.micro_batch_size, jacobi or 0)
        scheduler.step(increment=1)
        state.iteration = step
        state.consumed_train_samples += loop.global_batch_size
        dt = time.perf_counter() - t0
        window_time += dt
        window_steps += 1
        if loop.flops_per_sample is not None:
            window_flops += loop.flops_per_sample(jacobi) * loop.global_batch_size

        # The loss is known on the last stage only: every rank learns of a bad one and stops. One
        # all-reduce carries it and the SIGTERM flag.
        diverged, signalled = _any_rank(not (_finite(result.grad_norm) and _finite(result.loss)),
                                        loop.exit_signal_handler and signals.received)
        if diverged:
            what = f"loss {result.loss}, gradient norm {result.grad_norm}"
            where = (f" (the newest checkpoint is iteration {last_checkpoint[1]} in {last_checkpoint[0]})"
                     if last_checkpoint else "")
            raise TrainingDiverged(
                f"iteration {step}: {what}; stopping without saving{where}. Lower --lr or lengthen the "
                "warmup, then resume with --load and --override-opt_param-scheduler."
            )

        if step % loop.log_interval == 0:
            if reporter:
                tokens_per_s = window_steps * loop.global_batch_size * loop.seq_length / window_time
                values = {
                    "train/loss": result.loss,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/tokens_per_s": tokens_per_s,
                    "train/step_time_s": window_time / window_steps,
                    "train/consumed_samples": state.consumed_train_samples,
                }
                line = (
                    f"iteration {step:6d}/{loop.train_iters} | consumed samples {state.consumed_train_samples} | "
                    f"loss {result.loss:.4f} | " + (f"J {jacobi} | " if jacobi is not None else "")
                    + f"lr {values['train/lr']:.3e} | "
                )
                if result.grad_norm is not None:
                    values["train/grad_norm"] = result.grad_norm
                    line += f"grad norm {result.grad_norm:.3f} | "
                line += f"{1000 * window_time / window_steps:.1f} ms/step | {tokens_per_s:,.0f} tokens/s"
                if window_flops and torch.cuda.is_available():
                    tflops = window_flops / window_time / world / 1e12
                    values["train/tflops_per_device"] = tflops
                    line += f" | {tflops:.1f} TFLOP/s/device"
                    if peak:
                        values["train/mfu"] = tflops * 1e12 / peak
                        line += f" | MFU {100 * values['train/mfu']:.1f}%"
                log(line)
                metrics.write(step, values)
            window_time, window_flops, window_steps = 0.0, 0.0, 0

        if loop.eval_iters and step % loop.eval_interval == 0:
            run_eval(step, valid_batches)
        stop = signalled or (loop.exit_interval is not None and step % loop.exit_interval == 0)
        if loop.save and (stop or (loop.save_interval and step % loop.save_interval == 0)):
            save_fn(state)
            last_saved = step
            last_checkpoint = (loop.save, step)
        if stop:
            log(f"{'SIGTERM received' if signalled else '--exit-interval reached'}: exiting after iteration {step}")
            return state

    # As Megatron: the validation loss of the final weights, and the test loss once, at the end
    # (not again when a finished run is resumed).
    if loop.eval_iters and state.iteration >= first_step:
        if loop.train_iters % loop.eval_interval != 0:
            run_eval(state.iteration, valid_batches)
        run_eval(state.iteration, test_batches, "test", "test/loss")
    if loop.save and last_saved != state.iteration:
        save_fn(state)
    return state
