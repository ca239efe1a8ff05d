"""The training loop: resume from a checkpoint, then steps with logging, validation and saving.

Free of flag parsing: `pretrain.py` builds the model, optimizer, scheduler and data iterators and
hands them to `train` with a `LoopConfig`. Steps and validation run through
`parallel.pipeline` (latent_train_step / latent_eval_loss), which covers every layout: at PP=1 the
model's own multi-pass forward, at PP>1 the passes as weight-shared virtual pipeline chunks.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

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


def resume(load_dir: str, cfg, model_chunks, optimizer, scheduler, finetune: bool = False,
           load_optim: bool = True, log=print) -> TrainState:
    """Load the latest checkpoint under `load_dir` into the model (and optimizer and scheduler).

    No checkpoint there: a fresh start (the usual `--load X --save X` preemption setup), unless
    `finetune`, which needs weights. The checkpoint's model must have the same weights as `cfg`
    (its latent settings may differ: continued pretraining of a vanilla model with thoughts)."""
    from megatron.core import dist_checkpointing

    from megatron_latent.hf.convert import MODEL_CONFIG_FILE, load_config

    iteration = checkpointing.read_latest_iteration(load_dir)
    if iteration is None:
        if finetune:
            raise ResumeError(f"--finetune: no checkpoint in --load {load_dir}")
        log(f"no checkpoint in --load {load_dir}: starting from scratch")
        return TrainState()
    if os.path.isfile(os.path.join(load_dir, MODEL_CONFIG_FILE)):
        mismatches = cfg.weight_mismatches(load_config(load_dir))
        if mismatches:
            raise ResumeError(
                f"--load {load_dir}: the checkpoint's model differs from the flags' "
                f"(checkpoint vs flags) in {'; '.join(mismatches)}"
            )
    common = dist_checkpointing.load_common_state_dict(checkpointing.iteration_dir(load_dir, iteration))
    with_optim = load_optim and not finetune
    if with_optim and "opt_param_scheduler" not in common:
        raise ResumeError(
            f"--load {load_dir}: iteration {iteration} holds weights only (no optimizer state, e.g. "
            "converted from Hugging Face); pass --finetune (or --no-load-optim)"
        )
    info = checkpointing.load_checkpoint(
        load_dir, model_chunks, optimizer if with_optim else None, scheduler if with_optim else None,
        iteration=iteration,
    )
    if finetune:
        log(f"loaded weights of iteration {iteration} from {load_dir} (--finetune: training starts at 0)")
        return TrainState()
    extra = info["extra"]
    log(f"resumed from {load_dir} at iteration {iteration}")
    return TrainState(iteration, int(extra.get("consumed_train_samples", 0)))


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
    save_interval: Optional[int] = None
    exit_signal_handler: bool = False
    exit_interval: Optional[int] = None
    flops_per_sample: Optional[Callable[[int], float]] = None  # J -> model FLOPs of one sample
    checkpoint_extra: Dict = field(default_factory=dict)


class _SignalFlag:
    """SIGTERM sets a flag; the loop checks it (agreed over all ranks) at the end of each step."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(loop: LoopConfig, state: TrainState, model_chunks, optimizer, scheduler,
          train_iter: Iterator[dict], valid_batches: Optional[List[dict]],
          jacobi_for_step: Callable[[int], Optional[int]], jacobi_eval: Optional[int],
          save_fn: Callable[[TrainState], None], metrics, log, reporter: bool) -> TrainState:
    """Run steps state.iteration+1 .. train_iters; returns the final state.

    `jacobi_for_step(step)` is the step's J (drawn from the seed and the step alone, so a resumed
    run draws what the uninterrupted run would have). `save_fn(state)` writes a checkpoint."""
    from megatron_latent.training.metrics import peak_flops

    world = dist.get_world_size() if dist.is_initialized() else 1
    peak = peak_flops()
    signals = _SignalFlag(loop.exit_signal_handler)
    last_saved = state.iteration
    window_time, window_flops, window_steps = 0.0, 0.0, 0

    from megatron_latent.parallel.pipeline import latent_eval_loss, latent_train_step

    def run_eval(step):
        if not valid_batches:
            return
        loss = latent_eval_loss(model_chunks, iter(valid_batches), len(valid_batches), loop.seq_length,
                                loop.micro_batch_size, jacobi_eval)
        if reporter and loss is not None:
            log(f"validation at iteration {step} | loss {loss:.4f} | ppl {float(torch.exp(torch.tensor(min(loss, 50.0)))):.3f}")
            metrics.write(step, {"valid/loss": loss})

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

        if step % loop.log_interval == 0:
            if reporter:
                tokens_per_s = window_steps * loop.global_batch_size * loop.seq_length / window_time
                values = {
                    "train/loss": result.loss,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": result.grad_norm,
                    "train/tokens_per_s": tokens_per_s,
                    "train/step_time_s": window_time / window_steps,
                    "train/consumed_samples": state.consumed_train_samples,
                    "train/skipped": int(result.skipped),
                }
                line = (
                    f"iteration {step:6d}/{loop.train_iters} | consumed samples {state.consumed_train_samples} | "
                    f"loss {result.loss:.4f} | " + (f"J {jacobi} | " if jacobi is not None else "")
                    + f"lr {values['train/lr']:.3e} | grad norm {result.grad_norm:.3f} | "
                    f"{1000 * window_time / window_steps:.1f} ms/step | {tokens_per_s:,.0f} tokens/s"
                )
                if window_flops and torch.cuda.is_available():
                    tflops = window_flops / window_time / world / 1e12
                    values["train/tflops_per_device"] = tflops
                    line += f" | {tflops:.1f} TFLOP/s/device"
                    if peak:
                        values["train/mfu"] = tflops * 1e12 / peak
                        line += f" | MFU {100 * values['train/mfu']:.1f}%"
                if result.skipped:
                    line += " | skipped (non-finite gradients)"
                log(line)
                metrics.write(step, values)
            window_time, window_flops, window_steps = 0.0, 0.0, 0

        if loop.eval_iters and step % loop.eval_interval == 0:
            run_eval(step)
        signalled = loop.exit_signal_handler and signals.any_rank()
        stop = signalled or (loop.exit_interval is not None and step >= loop.exit_interval)
        if loop.save and (stop or (loop.save_interval and step % loop.save_interval == 0)):
            save_fn(state)
            last_saved = step
        if stop:
            log(f"{'SIGTERM received' if signalled else '--exit-interval reached'}: exiting after iteration {step}")
            return state

    if loop.eval_iters and loop.train_iters % loop.eval_interval != 0:
        run_eval(state.iteration)
    if loop.save and last_saved != state.iteration:
        save_fn(state)
    return state
