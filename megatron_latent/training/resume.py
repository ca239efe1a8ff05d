"""Resuming a run from its checkpoint: which iteration, checked against the flags (the model, the
latent settings, the fields that change the forward, the optimizer's layout, the lr schedule),
then the weights, optimizer, scheduler and data position loaded. `ResumeError` names the argument
or field a caller must change (the command line shows them as flags).
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
    """A checkpoint that cannot be resumed with these settings; the message names the argument or field."""


# The scheduler's state that a resumed run must share with its checkpoint.
_SCHEDULE_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                    "wd_incr_style", "wd_incr_steps")
# Fields that change what the weights compute: a run does not silently switch them.
_FORWARD_FIELDS = ("rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor", "norm_epsilon")
# The method's latent settings included: a pause or loop checkpoint does not silently go on as another method.
_LATENT_FIELDS = ("num_latent_thoughts", "thought_input", "interpolation_topk", "num_pause_tokens", "num_extra_loops",
                  "scale_embeddings", "num_ponder_steps", "ponder_feedback", "ponder_residual")


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
            raise ResumeError(f"finetune=True: no checkpoint in load_dir {load_dir}")
        logger.info(f"no checkpoint in {load_dir}: starting from scratch")
        return TrainState()
    if warning:
        logger.warning(warning)
    checkpointing.check_iteration(load_dir, iteration)
    common = checkpointing.read_common(load_dir, iteration)
    saved = checkpointing.checkpoint_model_config(load_dir, iteration, common)
    mismatches = cfg.weight_mismatches(saved)
    if mismatches:
        raise ResumeError(
            f"load_dir {load_dir}: the checkpoint's model differs from this run's "
            f"(checkpoint vs this run) in {'; '.join(mismatches)}"
        )
    changed = [f"{f} {getattr(saved.latent, f)} -> {getattr(cfg.latent, f)}"
               for f in _LATENT_FIELDS if getattr(saved.latent, f) != getattr(cfg.latent, f)]
    # Fields that change the forward but not the weights (e.g. a longer context's rope base).
    changed += [f"{f} {getattr(saved, f)} -> {getattr(cfg, f)}"
                for f in _FORWARD_FIELDS if getattr(saved, f) != getattr(cfg, f)]
    if changed and not finetune:
        raise ResumeError(
            f"load_dir {load_dir}: iteration {iteration} was trained with other settings "
            f"({', '.join(changed)}); continuing it with new ones is a new run: pass finetune=True"
        )
    with_optim = load_optim and not finetune
    if with_optim and "opt_param_scheduler" not in common:
        raise ResumeError(
            f"load_dir {load_dir}: iteration {iteration} holds weights only (no optimizer state, e.g. "
            "converted from Hugging Face); pass finetune=True (or load_optim=False)"
        )
    saved_flags = common.get("extra", {}).get("args", {})  # the settings the checkpoint was saved with
    if with_optim and optimizer_layout:
        _check_optimizer_layout(load_dir, saved_flags, optimizer_layout,
                                checkpointing.optimizer_sharding(common) == checkpointing.FULLY_RESHARDABLE)
    had = saved_flags.get("decoupled_lr") is not None
    if with_optim and saved_flags and had != ((schedule_flags or {}).get("decoupled_lr") is not None):
        # Not even the override flags help: the optimizer's parameter groups differ.
        raise ResumeError(
            f"load_dir {load_dir}: its optimizer state was saved {'with' if had else 'without'} decoupled_lr, whose "
            f"parameter group (the embedding and output layer) this run's optimizer {'lacks' if had else 'has'}; "
            "resume with the checkpoint's setting, or pass load_optim=False to start the Adam moments fresh")
    if with_optim and not (scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler):
        ours, theirs = scheduler.state_dict(), common["opt_param_scheduler"]
        differ = [f"{k}: {theirs[k]} vs {ours[k]}" for k in _SCHEDULE_FIELDS if k in theirs and theirs[k] != ours[k]]
        differ += [f"{k}: {saved_flags[k]} vs {v}" for k, v in (schedule_flags or {}).items()
                   if k in saved_flags and saved_flags[k] != v]
        if differ:
            raise ResumeError(
                f"load_dir {load_dir}: the lr schedule differs from the checkpoint's (checkpoint vs this run) in "
                f"{'; '.join(differ)}; pass override_opt_param_scheduler=True to follow this run's schedule or "
                "use_checkpoint_opt_param_scheduler=True to keep the checkpoint's"
            )
    was, now = saved.latent, cfg.latent
    j_changed = (was.jacobi_iters, was.jacobi_iters_eval) != (now.jacobi_iters, now.jacobi_iters_eval)
    if now.num_latent_thoughts and j_changed:
        logger.info(f"note: Jacobi iterations change from training {was.jacobi_iters} / eval "
                    f"{was.jacobi_iters_eval} to {now.jacobi_iters} / {now.jacobi_iters_eval}")
    info = checkpointing.load_checkpoint(
        load_dir, model_chunks, optimizer if with_optim else None, scheduler if with_optim else None,
        iteration=iteration,
    )
    if not with_optim:  # finetune, or load_optim=False
        # The optimizer's fp32 main weights were copied from the initial weights when it was built;
        # with bf16 they, not the loaded model weights, would be stepped and copied back.
        optimizer.reload_model_params()
        if finetune:
            logger.info(f"loaded weights of iteration {iteration} from {load_dir} (fine-tuning: training starts at 0)")
            return TrainState()
        # Fresh Adam moments, but the lr where the schedule is at this iteration.
        scheduler.step(increment=iteration)
        logger.info("optimizer state not loaded: it starts fresh; "
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
            ["use_distributed_optimizer=True"] * bool(d.get("use_distributed_optimizer"))
            + [f"tensor_model_parallel_size {d.get('tensor_model_parallel_size')}",
               f"pipeline_model_parallel_size {d.get('pipeline_model_parallel_size')}"]
            + ["bf16=True"] * bool(d.get("bf16"))
            + [f"num_virtual_stages_per_pipeline_rank {d.get('num_virtual_stages_per_pipeline_rank')}"]
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
            f"load_dir {load_dir}: its optimizer state was saved with {flags(saved)} and cannot be read with "
            f"{flags(now)} (plain and distributed optimizer states differ; distributed-optimizer state loads with the "
            "same precision only, and in the older bucket format at the same TP, PP and VPP only); resume with "
            "the checkpoint's settings, or pass load_optim=False to start the Adam moments fresh")


# ------------------------------------------------------------------------------ the loop
