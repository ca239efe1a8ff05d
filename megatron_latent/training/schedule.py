"""The lr and weight-decay schedule of Megatron-LM's flags, on megatron-core's OptimizerParamScheduler.

Iteration-based flags (--train-iters, --lr-decay-iters, --lr-warmup-iters) count the scheduler's
steps in iterations; sample-based ones (--train-samples, --lr-decay-samples, --lr-warmup-samples)
in samples, the scheduler then advancing by each iteration's global batch (--global-batch-size, or
the growing one of --rampup-batch-size), as Megatron-LM's does. Both give Megatron-LM's lr at every
iteration (its steps are samples in either case; with a fixed batch size the two units differ by a
constant factor).
"""

from __future__ import annotations

import argparse
from typing import Callable

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_latent.config import ConfigError
from megatron_latent.training.rampup import BatchSizes

# Flags of the schedule that OptimizerParamScheduler's state does not hold: a resumed run compares
# them with the checkpoint's saved flags (the state's own fields are compared by resume.resume).
UNSTORED = ("lr_warmup_init", "lr_wsd_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
            "decoupled_lr", "decoupled_min_lr", "rampup_batch_size")


class _SampleScheduler(OptimizerParamScheduler):
    """Counts samples: each iteration advances by its global batch, `batch_at(samples so far)`
    (constant, or growing with --rampup-batch-size), as Megatron-LM's steps by the batch it trained."""

    def __init__(self, *args, batch_at: Callable[[int], int], **kwargs):
        self.batch_at = batch_at
        self.raw = True  # the base class's own steps (its first, to 0, and a load's) count samples
        super().__init__(*args, **kwargs)
        self.raw = False

    def step(self, increment: int) -> None:
        if self.raw:
            return super().step(increment)
        for _ in range(increment):  # iterations
            super().step(self.batch_at(self.num_steps))

    def load_state_dict(self, state_dict: dict) -> None:
        self.raw = True
        try:
            super().load_state_dict(state_dict)
        finally:
            self.raw = False


def build_scheduler(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """megatron-core's scheduler as Megatron-LM builds it from these flags (raises ConfigError)."""
    if args.train_samples is not None:
        batches, what, suffix = BatchSizes(args.global_batch_size, rampup=args.rampup_batch_size), "samples", "samples"
        train, decay = args.train_samples, args.lr_decay_samples or args.train_samples
        warmup, wsd = args.lr_warmup_samples, args.lr_wsd_decay_samples
    else:
        batches, what, suffix = None, "iterations", "iters"
        train, decay = args.train_iters, args.lr_decay_iters or args.train_iters
        warmup, wsd = args.lr_warmup_iters, args.lr_wsd_decay_iters
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay  # Megatron-LM's: of the decay length, not rounded
    if warmup >= decay:
        raise ConfigError(f"the lr warmup ({warmup:g} {what}) must be shorter than the decay ({decay} {what}: "
                          f"lr_decay_{suffix}, default train_{suffix})")
    if args.lr_decay_style == "WSD" and wsd is None:
        raise ConfigError(f"lr_decay_style WSD needs lr_wsd_decay_{suffix} (the length of its final decay)")
    if args.weight_decay_incr_style == "constant":
        start_wd = end_wd = args.weight_decay
    else:
        start_wd, end_wd = args.start_weight_decay, args.end_weight_decay
        if start_wd is None or end_wd is None or not 0 <= start_wd <= end_wd:
            raise ConfigError(f"weight_decay_incr_style {args.weight_decay_incr_style} needs start_weight_decay "
                              "and end_weight_decay, 0 <= start <= end")
    if args.lr_warmup_init > args.lr:
        raise ConfigError(f"lr_warmup_init {args.lr_warmup_init} exceeds max_lr {args.lr}")
    kwargs = dict(
        init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=args.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=train, wd_incr_style=args.weight_decay_incr_style, wsd_decay_steps=wsd,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        # Neither flag: a resumed run must have the checkpoint's schedule (resume.resume checks it).
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    if batches is None:  # steps are iterations
        return OptimizerParamScheduler(optimizer, **kwargs)
    return _SampleScheduler(optimizer, batch_at=batches.global_batch, **kwargs)
