"""The training loop: resume from a checkpoint, then steps with logging, validation and saving.

Free of flag parsing: `pretrain.py` builds the model, optimizer, scheduler and data and hands them
to `train` as one `Trainer`. Steps and validation run through `training.engine` (latent_train_step /
latent_eval_loss over `parallel.pipeline`), which covers every layout: at PP=1 the model's own
multi-pass forward, at PP>1 the passes as weight-shared virtual pipeline chunks. Messages go to
the `megatron_latent.training.loop` logger; the driver decides which rank prints them.
"""

from __future__ import annotations

import datetime
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_latent import platform
from megatron_latent.training import batches as batching
from megatron_latent.training.engine import latent_eval_loss, latent_train_step
from megatron_latent.training.metrics import MetricsWriter, peak_flops
from megatron_latent.training.resume import TrainState

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops before it saves anything."""


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)


# Scheduler settings a resumed run compares with its checkpoint, and the flags that set them.
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
    exit_duration_in_mins: Optional[float] = None  # stop (saving) once training ran this long
    flops_per_sample: Optional[Callable[[Optional[int]], float]] = None  # J -> model FLOPs of one sample
    extra_save_iters: frozenset = frozenset()  # saved besides the interval's (0: before the first step)
    batch_sizes: Optional[Any] = None  # rampup.BatchSizes of --rampup-batch-size (None: every batch the same)

    def batch_at(self, consumed_samples: int) -> Tuple[int, int]:
        """(global batch, micro-batches per data-parallel rank) of the iteration after these samples."""
        if self.batch_sizes is None:
            return self.global_batch_size, self.num_microbatches
        return self.batch_sizes.at(consumed_samples)


@dataclass
class Trainer:
    """Everything `train` works on, built once by the driver."""

    settings: LoopConfig
    model: List[torch.nn.Module]  # this rank's DDP-wrapped chunks
    optimizer: Any
    scheduler: Any
    train_batches: Iterator[dict]  # this rank's micro-batches, from the resumed data position on
    valid_batches: Optional[List[dict]] = None  # on the host; the same ones at every evaluation
    test_batches: Optional[List[dict]] = None
    # J of a training step, drawn from the seed and the step alone (a resumed run draws what the
    # uninterrupted run would have); None for a vanilla GPT.
    jacobi_iters_for_step: Callable[[int], Optional[int]] = lambda step: None
    jacobi_iters_eval: Optional[int] = None  # the evaluation J; None for a vanilla GPT
    save: Optional[Callable[[TrainState], None]] = None  # writes a checkpoint to settings.save
    background_saves: Any = None  # checkpointing.BackgroundSaves with --async-save
    metrics: Optional[MetricsWriter] = None
    reporter: bool = True  # this rank holds the reported loss (last stage, TP and DP rank 0)
    monitor: Optional[Any] = None  # training.monitoring.Monitor: diagnostics and the passes' signals
    jacobi_iters_eval_sweep: tuple = ()  # each validation also reports the loss at these J (valid/loss_J<j>)
    downstream: Optional[Any] = None  # training.downstream.DownstreamEvaluator (reporting rank only)
    downstream_interval: Optional[int] = None  # evaluate the saves at multiples of this (None: every save)
    downstream_due: Optional[int] = None  # a save to evaluate once it is published (--async-save)
    state: TrainState = field(default_factory=TrainState)


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
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class _Clock:
    """This run's times: the window of steps since the last log line (ms/step, tokens/s, FLOP/s),
    the elapsed time, and the ETA."""

    def __init__(self, train_iters: int):
        self.train_iters = train_iters
        self.start = time.perf_counter()
        self.first = None  # (step, end time) of this run's first step
        self.reset_window()

    def reset_window(self) -> None:
        self.window_time, self.window_flops, self.window_steps, self.window_samples = 0.0, 0.0, 0, 0

    def step_done(self, step: int, seconds: float, flops: float, samples: int) -> None:
        self.window_time += seconds
        self.window_flops += flops
        self.window_steps += 1
        self.window_samples += samples
        if self.first is None:
            self.first = (step, time.perf_counter())

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, step: int) -> float:
        """Seconds until train_iters at this run's mean wall time per step. The first step is left
        out once there are others: it pays one-time costs (communicators, allocator, data-loader
        workers, lazy initialisation). Wall time, so evaluations and saves count, spread over the
        steps."""
        first_step, first_end = self.first
        if step > first_step:
            per_step = (time.perf_counter() - first_end) / (step - first_step)
        else:
            per_step = first_end - self.start
        return per_step * (self.train_iters - step)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _report_step(t: Trainer, step: int, jacobi: Optional[int], result, clock: _Clock, batch: int,
                 extra: Optional[dict] = None) -> None:
    """The iteration line, and its record in metrics.jsonl (with `extra`, the monitor's values)."""
    s = t.settings
    step_time = clock.window_time / clock.window_steps
    values = {
        "train/loss": result.loss,
        "train/lr": t.optimizer.param_groups[0]["lr"],
        "train/tokens_per_s": clock.window_samples / clock.window_steps * s.seq_length / step_time,
        "train/step_time_s": step_time,
        "train/consumed_samples": t.state.consumed_train_samples,
    }
    line = (f"iteration {step:6d}/{s.train_iters} | consumed samples {t.state.consumed_train_samples} | "
            f"loss {result.loss:.4f} | " + (f"J {jacobi} | " if jacobi is not None else "")
            + f"lr {values['train/lr']:.3e} | ")
    if s.batch_sizes is not None:  # Megatron-LM's "global batch size" of the iteration
        values["train/global_batch_size"] = batch
        line += f"global batch size {batch} | "
    decoupled = [g["lr"] for g in t.optimizer.param_groups if g.get("is_decoupled_lr")]
    if decoupled:  # --decoupled-lr: the embedding and output layer's
        values["train/decoupled_lr"] = decoupled[0]
        line += f"decoupled lr {decoupled[0]:.3e} | "
    if result.grad_norm is not None:
        values["train/grad_norm"] = result.grad_norm
        line += f"grad norm {result.grad_norm:.3f} | "
    line += f"{1000 * step_time:.1f} ms/step | {values['train/tokens_per_s']:,.0f} tokens/s"
    if clock.window_flops:
        # Model FLOPs (exact counts, models/flops.py) per second and device, on any device; MFU
        # where the device's peak is known.
        world = dist.get_world_size() if dist.is_initialized() else 1
        tflops = clock.window_flops / clock.window_time / world / 1e12
        values["train/tflops_per_device"] = tflops
        line += f" | {tflops:.3g} TFLOP/s/device"
        peak = peak_flops()
        if peak:
            values["train/mfu"] = tflops * 1e12 / peak
            line += f" | MFU {100 * values['train/mfu']:.1f}%"
    values["train/elapsed_s"], values["train/eta_s"] = clock.elapsed(), clock.eta(step)
    values.update(extra or {})
    if "train/params_norm" in values:
        line += f" | params norm {values['train/params_norm']:.3f}"
    line += f" | elapsed {_hms(values['train/elapsed_s'])} | ETA {_hms(values['train/eta_s'])}"
    logger.info(line)
    if t.metrics is not None:
        t.metrics.write(step, values)


def _evaluate(t: Trainer, step: int, batches: Optional[List[dict]], name: str = "validation",
              key: str = "valid/loss") -> None:
    if not batches:
        return
    # Evaluation batches wait on the host; each is moved to the device when it is used.
    loss = latent_eval_loss(t.model, (batching.to_device(b) for b in batches), len(batches),
                            t.settings.seq_length, t.settings.micro_batch_size, t.jacobi_iters_eval)
    swept = {j: latent_eval_loss(t.model, (batching.to_device(b) for b in batches), len(batches),
                                 t.settings.seq_length, t.settings.micro_batch_size, j)
             for j in (t.jacobi_iters_eval_sweep if key == "valid/loss" else ())}
    if t.reporter and loss is not None:
        logger.info(f"{name} at iteration {step} | loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.3f}"
                    + "".join(f" | loss J={j} {v:.4f}" for j, v in swept.items()))
        if t.metrics is not None:
            t.metrics.write(step, {key: loss, **{f"{key}_J{j}": v for j, v in swept.items()}})


def _downstream(t: Trainer, saved: Optional[int] = None, final: bool = False, wait: bool = False) -> None:
    """Start the evaluation of the checkpoint just saved (`saved`) when it is due, and write the
    results of those that finished at their own iterations."""
    if t.downstream is None:
        return
    if saved is not None and (final or t.downstream_interval is None or saved % t.downstream_interval == 0):
        t.downstream_due = saved
    # A background save is evaluated once it is published (its files complete on disk).
    if t.downstream_due is not None and (t.background_saves is None or t.background_saves.pending is None):
        t.downstream.submit(t.downstream_due)
        t.downstream_due = None
    for iteration, values in t.downstream.poll(wait):
        if values and t.metrics is not None:
            t.metrics.write(iteration, values)


def train(t: Trainer) -> TrainState:
    """Run steps t.state.iteration+1 .. train_iters; returns the final state.

    Raises TrainingDiverged at a non-finite loss or gradient norm, before anything is saved."""
    s, state = t.settings, t.state
    signals = _SignalFlag(s.exit_signal_handler)
    clock = _Clock(s.train_iters)
    started = time.perf_counter()
    first_step = state.iteration + 1
    last_saved = state.iteration
    last_checkpoint = (s.load, state.iteration) if s.load and state.iteration else None
    if s.save and state.iteration == 0 and 0 in s.extra_save_iters:
        t.save(state)  # the initial weights
    num_micro = s.batch_at(state.consumed_train_samples)[1]

    while state.iteration < s.train_iters:
        step = state.iteration + 1
        t0 = time.perf_counter()
        jacobi = t.jacobi_iters_for_step(step)
        batch, micro_count = s.batch_at(state.consumed_train_samples)
        if micro_count != num_micro:
            logger.info(f"global batch size {batch} from iteration {step} on (batch-size rampup)")
            # As Megatron-LM: a checkpoint before the batch grows.
            if s.save and last_saved != state.iteration:
                t.save(state)
                last_saved = state.iteration
                last_checkpoint = (s.save, state.iteration)
            num_micro = micro_count
        micro = batching.take_on_every_rank(t.train_batches, micro_count)
        if t.monitor is not None:
            t.monitor.step_begins(t.model, step, log=step % s.log_interval == 0)
        result = latent_train_step(t.model, t.optimizer, iter(micro), micro_count,
                                   s.seq_length, s.micro_batch_size, jacobi or 0)
        t.scheduler.step(increment=1)  # by the iteration's samples when it counts samples
        if t.monitor is not None:
            t.monitor.step_ends(t.model, step)
        state.iteration = step
        state.consumed_train_samples += batch
        flops = s.flops_per_sample(jacobi) * batch if s.flops_per_sample else 0.0
        clock.step_done(step, time.perf_counter() - t0, flops, batch)

        # The loss is known on the last stage only: every rank learns of a bad one and stops. One
        # all-reduce carries it and the SIGTERM flag.
        timed_out = s.exit_duration_in_mins is not None and time.perf_counter() - started > 60 * s.exit_duration_in_mins
        diverged, signalled = _any_rank(not (_finite(result.grad_norm) and _finite(result.loss)),
                                        (s.exit_signal_handler and signals.received) or timed_out)
        if t.background_saves is not None:  # every rank at the same point: publish a finished save
            if diverged:
                t.background_saves.wait()
            else:
                t.background_saves.poll()
        if diverged:
            where = (f" (the newest checkpoint is iteration {last_checkpoint[1]} in {last_checkpoint[0]})"
                     if last_checkpoint else "")
            raise TrainingDiverged(
                f"iteration {step}: loss {result.loss}, gradient norm {result.grad_norm}; stopping without "
                f"saving{where}. Lower max_lr or lengthen the warmup, then resume from load_dir with "
                "override_opt_param_scheduler=True."
            )

        if step % s.log_interval == 0:
            extra = t.monitor.values(t.model) if t.monitor is not None else None  # on every rank
            if t.reporter:
                _report_step(t, step, jacobi, result, clock, batch, extra)
            clock.reset_window()
        if s.eval_iters and step % s.eval_interval == 0:
            _evaluate(t, step, t.valid_batches)
        stop = signalled or (s.exit_interval is not None and step % s.exit_interval == 0)
        if s.save and (stop or (s.save_interval and step % s.save_interval == 0)
                       or step in s.extra_save_iters):
            t.save(state)
            last_saved = step
            last_checkpoint = (s.save, step)
            _downstream(t, step, final=(stop and not signalled) or step == s.train_iters)
        else:
            _downstream(t)
        if stop:
            _wait_for_saves(t)
            _downstream(t, wait=not signalled)  # a job told to stop does not wait for it
            why = "exit_duration_in_mins reached" if timed_out else "SIGTERM received"
            logger.info(f"{why if signalled else 'exit_interval reached'}: "
                        f"exiting after iteration {step}")
            return state

    # As Megatron: the validation loss of the final weights, and the test loss once, at the end
    # (not again when a finished run is resumed).
    if s.eval_iters and state.iteration >= first_step:
        if s.train_iters % s.eval_interval != 0:
            _evaluate(t, state.iteration, t.valid_batches)
        _evaluate(t, state.iteration, t.test_batches, "test", "test/loss")
    if s.save and last_saved != state.iteration:
        t.save(state)
        _downstream(t, state.iteration, final=True)
    _wait_for_saves(t)
    _downstream(t, wait=True)
    return state


def _wait_for_saves(t: Trainer) -> None:
    """No exit leaves a background save unpublished."""
    if t.background_saves is not None:
        t.background_saves.wait()
