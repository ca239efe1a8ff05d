"""Resuming a run from its checkpoint: which iteration, checked against the flags (the model, the
latent settings, the fields that change the forward, the optimizer's layout, the lr schedule),
then the weights, optimizer, scheduler and data position loaded. `ResumeError` names the flag a
user must change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from megatron_latent.training import checkpointing

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with these flags; the message names the flag."""


_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction",
    "lr_decay_steps": "--lr-decay-iters/--lr-decay-samples/--train-iters/--train-samples",
    "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay/--start-weight-decay",
    "end_wd": "--weight-decay/--end-weight-decay", "wd_incr_style": "--weight-decay-incr-style",
    "wd_incr_steps": "--train-iters/--train-samples",
}
# Latent settings that change what the weights compute: a run does not silently switch them.
_FORWARD_FLAGS = {"rotary_base": "--rotary-base", "rotary_percent": "--rotary-percent",
                  "rope_scaling": "--use-rope-scaling", "rope_scaling_factor": "--rope-scaling-factor",
                  "norm_epsilon": "--norm-epsilon"}
# The method included: a pause or loop checkpoint does not silently go on as another method.
_LATENT_FLAGS = {"num_latent_thoughts": "--num-latent-thoughts", "thought_input": "--thought-input",
                 "interpolation_topk": "--interpolation-topk", "num_pause_tokens": "--num-pause-tokens",
                 "num_extra_loops": "--num-extra-loops", "scale_embeddings": "--scale-embeddings",
                 "num_ponder_steps": "--num-ponder-steps", "ponder_feedback": "--ponder-feedback",
                 "ponder_residual": "--ponder-residual"}


def resume(load_dir: str, cfg, model_chunks, optimizer, scheduler, finetune: bool = False,
           load_optim: bool = True, optimizer_layout: Optional[dict] = None,
           schedule_flags: Optional[dict] = None) -> TrainState:
    """Load the latest checkpoint under `load_dir` into the model (and optimizer and scheduler).

    No checkpoint there: a fresh start (the usual `--load X --save X` preemption setup), unless
    `finetune`, which needs weights. The checkpoint's model must have the same weights as `cfg`.
    Its latent settings may differ only with `finetune` (continued pretraining of a vanilla model
    with thoughts is a new run); its lr schedule may differ only when the scheduler was built to
    override it or to take the checkpoint's (Megatron's two flags). `optimizer_layout` (the
    run's tensor_model_parallel_size, pipeline_model_parallel_size, use_distributed_optimizer) is
    checked against the checkpoint's: distributed-optimizer state of the older bucket format
    reshards over DP only (the fully reshardable format, written now, at any layout).
    `schedule_flags` (flag destination -> value) are the schedule's settings that the scheduler's
    state does not hold; they are checked against the flags saved with the checkpoint."""
    # The tracker's iteration (or, without a tracker, the newest complete one), checked for
    # missing or truncated files first: CheckpointError names the file, on every rank alike.
    iteration, warning = checkpointing.find_resume_iteration(load_dir)
    if iteration is None:
        if finetune:
            raise ResumeError(f"--finetune: no checkpoint in --load {load_dir}")
        logger.info(f"no checkpoint in --load {load_dir}: starting from scratch")
        return TrainState()
    if warning:
        logger.warning(warning)
    checkpointing.check_iteration(load_dir, iteration)
    common = checkpointing.read_common(load_dir, iteration)
    saved = checkpointing.checkpoint_model_config(load_dir, iteration, common)
    mismatches = cfg.weight_mismatches(saved)
    if mismatches:
        raise ResumeError(
            f"--load {load_dir}: the checkpoint's model differs from the flags' "
            f"(checkpoint vs flags) in {'; '.join(mismatches)}"
        )
    changed = [f"{flag} {getattr(saved.latent, f)} -> {getattr(cfg.latent, f)}"
               for f, flag in _LATENT_FLAGS.items() if getattr(saved.latent, f) != getattr(cfg.latent, f)]
    # Fields that change the forward but not the weights (e.g. a longer context's rope base).
    changed += [f"{flag} {getattr(saved, f)} -> {getattr(cfg, f)}"
                for f, flag in _FORWARD_FLAGS.items() if getattr(saved, f) != getattr(cfg, f)]
    if changed and not finetune:
        raise ResumeError(
            f"--load {load_dir}: iteration {iteration} was trained with other settings "
            f"({', '.join(changed)}); continuing it with new ones is a new run: pass --finetune"
        )
    with_optim = load_optim and not finetune
    if with_optim and "opt_param_scheduler" not in common:
        raise ResumeError(
            f"--load {load_dir}: iteration {iteration} holds weights only (no optimizer state, e.g. "
            "converted from Hugging Face); pass --finetune (or --no-load-optim)"
        )
    if with_optim and optimizer_layout:
        _check_optimizer_layout(load_dir, common.get("extra", {}).get("args", {}), optimizer_layout,
                                checkpointing.optimizer_sharding(common) == checkpointing.FULLY_RESHARDABLE)
    saved_flags = common.get("extra", {}).get("args", {})
    had = saved_flags.get("decoupled_lr") is not None
    if with_optim and saved_flags and had != ((schedule_flags or {}).get("decoupled_lr") is not None):
        # Not even the override flags help: the optimizer's parameter groups differ.
        raise ResumeError(
            f"load_dir {load_dir}: its optimizer state was saved {'with' if had else 'without'} decoupled_lr, whose "
            f"parameter group (the embedding and output layer) this run's optimizer {'lacks' if had else 'has'}; "
            "resume with the checkpoint's setting, or pass load_optim=False to start the Adam moments fresh")
    if with_optim and not (scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler):
        ours, theirs = scheduler.state_dict(), common["opt_param_scheduler"]
        differ = sorted({f"{_SCHEDULE_FLAGS[k]} ({k} {theirs[k]} vs {ours[k]})"
                         for k in _SCHEDULE_FLAGS if k in theirs and theirs[k] != ours[k]})
        flags = common.get("extra", {}).get("args", {})
        differ += [f"--{k.replace('_', '-')} ({flags[k]} vs {v})"
                   for k, v in (schedule_flags or {}).items() if k in flags and flags[k] != v]
        if differ:
            raise ResumeError(
                f"--load {load_dir}: the lr schedule differs from the checkpoint's (checkpoint vs flags) in "
                f"{'; '.join(differ)}; pass --override-opt_param-scheduler to follow the flags or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )
    was, now = saved.latent, cfg.latent
    if (was.training_range, was.eval_jacobi_iters) != (now.training_range, now.eval_jacobi_iters):
        logger.info(f"note: Jacobi iterations change from training {was.training_range} / eval "
                    f"{was.eval_jacobi_iters} to {now.training_range} / {now.eval_jacobi_iters}")
    info = checkpointing.load_checkpoint(
        load_dir, model_chunks, optimizer if with_optim else None, scheduler if with_optim else None,
        iteration=iteration,
    )
    if not with_optim:  # --finetune or --no-load-optim
        # The optimizer's fp32 main weights were copied from the initial weights when it was built;
        # with bf16 they, not the loaded model weights, would be stepped and copied back.
        optimizer.reload_model_params()
        if finetune:
            logger.info(f"loaded weights of iteration {iteration} from {load_dir} (--finetune: training starts at 0)")
            return TrainState()
        # Fresh Adam moments, but the lr where the schedule is at this iteration.
        scheduler.step(increment=iteration)
        logger.info("--no-load-optim: optimizer state starts fresh; "
                    f"the lr schedule continues at iteration {iteration}")
    extra = info["extra"]
    logger.info(f"resumed from {load_dir} at iteration {iteration}")
    return TrainState(iteration, int(extra.get("consumed_train_samples", 0)))


def _check_optimizer_layout(load_dir: str, saved: dict, now: dict, model_space: bool = False) -> None:
    """Distributed-optimizer state in model space (fully reshardable) loads at any layout with the
    same precision; the bucket format of older checkpoints at their TP, PP, VPP and precision only
    (DP may change)."""
    if not saved:
        return  # saved by an older driver: megatron's own checks apply
    def flags(d):
        return " ".join(
            ["--use-distributed-optimizer"] * bool(d.get("use_distributed_optimizer"))
            + [f"--tensor-model-parallel-size {d.get('tensor_model_parallel_size')}",
               f"--pipeline-model-parallel-size {d.get('pipeline_model_parallel_size')}"]
            + ["--bf16"] * bool(d.get("bf16"))
            + [f"--num-virtual-stages-per-pipeline-rank {d['num_virtual_stages_per_pipeline_rank']}"]
            * bool(d.get("num_virtual_stages_per_pipeline_rank")))

    distributed = bool(saved.get("use_distributed_optimizer")), bool(now["use_distributed_optimizer"])
    # The older bucket format is keyed by TP/PP rank, gradient-buffer dtype and model chunk; the
    # fully reshardable one loads at any TP, PP and VPP (with the same precision).
    def layout(d):
        if model_space:
            return bool(d.get("bf16"))
        return (d.get("tensor_model_parallel_size"), d.get("pipeline_model_parallel_size"),
                bool(d.get("bf16")), d.get("num_virtual_stages_per_pipeline_rank") or 1)

    if distributed[0] != distributed[1] or (distributed[0] and layout(saved) != layout(now)):
        raise ResumeError(
            f"--load {load_dir}: its optimizer state was saved with {flags(saved)} and cannot be read with "
            f"{flags(now)} (plain and distributed optimizer states differ; distributed-optimizer state loads with the "
            "same precision only, and in the older bucket format at the same TP, PP and VPP only); resume with "
            "the checkpoint's settings, or pass --no-load-optim to start the Adam moments fresh")


# ------------------------------------------------------------------------------ the loop
