"""Pipeline parallelism for the latent model: build the stages, run a step through megatron's schedules.

At PP=1 the latent model runs its own multi-pass forward (megatron's no-pipelining schedule). At
PP>1 every pass of the forward is a virtual pipeline chunk (see `parallel.passes`): for a step with
J Jacobi iterations there are P = N + J + 1 passes (one for N = 0), and with the model's own
interleaved layer chunks (v per rank) V = P * v virtual chunks, run by megatron's interleaved
schedule (its 1F1B schedule when V = 1). Chunk k = p * v + j is pass p over layer chunk j.

The driver's side:

    chunks = build_latent_pipeline(cfg)                     # this rank's stage module(s)
    model = engine.wrap_ddp(chunks); opt = engine.build_optimizer(model, ...)
    engine.configure_model_for_training(model, opt)
    J = cfg.latent_settings().jacobi_iters_for_step(step)   # the same on every rank
    result = latent_train_step(model, opt, batches, M, seq_length, mbs, J)
    loss = latent_eval_loss(model, eval_batches, M, seq_length, mbs)

`batches` is one iterator over this step's M micro-batches (dicts with tokens, labels,
position_ids, optional attention_mask and loss_mask); every virtual chunk reads its own copy of it,
in lockstep. Checkpoints (training/checkpointing.py) hold the stage modules' weights once, under
megatron's global keys, so they load at any other TP/PP.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from functools import partial
from typing import Callable, List, Optional

import torch

from megatron_latent.config import ModelConfig
from megatron_latent.parallel.passes import PassChunk


class PipelineConfigError(ValueError):
    """A layout or setting the latent pipeline cannot run; the message names the flag."""


# ------------------------------------------------------------------------------------ checks
def validate_model_split(cfg: ModelConfig, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                         virtual_chunks: int = 1) -> None:
    """Layers over stages (and the model's own virtual chunks); heads/vocab over TP ranks."""
    pp, v = pipeline_model_parallel_size, virtual_chunks
    cfg.check_parallel(tensor_model_parallel_size, pp)
    if v < 1:
        raise PipelineConfigError(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {v}")
    if v > 1 and pp == 1:
        raise PipelineConfigError(
            f"--num-virtual-stages-per-pipeline-rank {v} needs --pipeline-model-parallel-size > 1"
        )
    if cfg.num_layers % (pp * v):
        raise PipelineConfigError(
            f"--num-layers {cfg.num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"--num-virtual-stages-per-pipeline-rank {v}"
        )


def validate_schedule(num_microbatches: int, pipeline_model_parallel_size: int, num_chunks: int,
                      microbatch_group_size: Optional[int] = None) -> None:
    """The micro-batch count megatron's interleaved schedule accepts, checked before it runs."""
    pp, m = pipeline_model_parallel_size, num_microbatches
    if m < 1:
        raise PipelineConfigError(
            f"{m} micro-batches per step: --global-batch-size must be at least --micro-batch-size x "
            "data-parallel size"
        )
    if pp == 1 or num_chunks == 1:
        return
    g = microbatch_group_size or pp
    if m < g or (0 < m % g < pp):
        raise PipelineConfigError(
            f"--global-batch-size / (--micro-batch-size x data-parallel size) gives {m} micro-batches "
            f"per step; the latent passes run as {num_chunks} virtual pipeline chunks, whose "
            f"interleaved schedule needs a multiple of --pipeline-model-parallel-size {pp}"
            + (f" (--microbatch-group-size-per-virtual-pipeline-stage {g})" if g != pp else "")
        )


def validate_stage_config(config, seq_length: Optional[int] = None) -> None:
    """TransformerConfig settings the pass wiring does not support."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise PipelineConfigError(
            "--context-parallel-size > 1 is not supported by the latent model (the slot layout "
            "interleaves thoughts with tokens along the sequence that context parallelism splits)"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise PipelineConfigError("--defer-embedding-wgrad-compute is not supported with the latent pipeline")
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel and seq_length is not None and seq_length % tp:
        raise PipelineConfigError(
            f"--seq-length {seq_length} is not divisible by --tensor-model-parallel-size {tp} "
            "(--sequence-parallel splits every pass's sequence over the TP ranks)"
        )


def _validate_ddp(chunks) -> None:
    for c in chunks:
        ddp = getattr(c, "ddp_config", None)
        if ddp is None:
            continue
        if ddp.overlap_grad_reduce:
            # Every pass adds to the same gradient buffer; megatron's per-parameter "ready" count
            # is learned on the first step and the number of passes changes with J.
            raise PipelineConfigError(
                "--overlap-grad-reduce is not supported with the latent pipeline (each weight "
                "receives one gradient per pass, and the number of passes changes with J)"
            )
        if ddp.overlap_param_gather:
            raise PipelineConfigError(
                "--overlap-param-gather is not supported with the latent pipeline (the passes call "
                "the stage's layers directly, bypassing DDP's forward hooks)"
            )


# ------------------------------------------------------------------------------------ building
def build_latent_pipeline(cfg: ModelConfig, config=None, use_te: Optional[bool] = None) -> List[torch.nn.Module]:
    """This rank's stage module(s) of the latent model: one LatentGPTModel, or v of them when
    `config.virtual_pipeline_model_parallel_size` = v splits the layers into interleaved chunks.
    Wrap them in megatron DDP (engine.wrap_ddp) and build the optimizer over them."""
    from megatron.core import parallel_state as ps

    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if config is None:
        config = cfg.to_transformer_config(tp, pp, ps.get_virtual_pipeline_model_parallel_world_size())
    v = config.virtual_pipeline_model_parallel_size or 1
    validate_model_split(cfg, tp, pp, v)
    validate_stage_config(config)
    latent = cfg.latent_settings()
    if pp == 1:
        return [build_gpt_model(cfg, True, True, config=config, use_te=use_te, model_cls=LatentGPTModel, latent=latent)]
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return [
        build_gpt_model(
            cfg, first and j == 0, last and j == v - 1, vp_stage=j if v > 1 else None, config=config,
            use_te=use_te, model_cls=LatentGPTModel, latent=latent, pipeline_stage=True,
        )
        for j in range(v)
    ]


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def pass_slots(latent, num_jacobi_iters: int) -> List[int]:
    """Slots per position of each pass of a step with `num_jacobi_iters` Jacobi iterations."""
    return latent.pass_lengths(num_jacobi_iters if latent.num_latent_thoughts else 0)


def pass_chunks(model_chunks, num_jacobi_iters: int) -> List[PassChunk]:
    """The virtual chunks of one step: pass p over layer chunk j is chunk p * v + j."""
    stages = [_unwrap(c) for c in model_chunks]
    lengths = pass_slots(stages[0].latent, num_jacobi_iters)
    v, num = len(stages), len(lengths) * len(stages)
    stage_config = stages[0].config
    config = copy.copy(stage_config)
    config.virtual_pipeline_model_parallel_size = num if num > 1 else None
    config.variable_seq_lengths = False  # fixed-shape messages, see parallel.passes
    if stage_config.finalize_model_grads_func is not None:
        # The schedule hands its model list (the pass chunks) to finalize; the gradients live in
        # the DDP-wrapped stages, once each.
        config.finalize_model_grads_func = partial(_finalize_stages, stage_config.finalize_model_grads_func,
                                                   list(model_chunks))
    return [PassChunk(model_chunks[j], p, lengths, config, p * v + j) for p in range(len(lengths)) for j in range(v)]


def _finalize_stages(finalize, stages, _pass_chunks, num_tokens=None, **kwargs):
    return finalize(stages, num_tokens, **kwargs)


@contextmanager
def _virtual_pipeline_size(size: Optional[int]):
    from megatron.core import parallel_state as ps

    saved = ps.get_virtual_pipeline_model_parallel_world_size()
    ps.set_virtual_pipeline_model_parallel_world_size(size)
    try:
        yield
    finally:
        ps.set_virtual_pipeline_model_parallel_world_size(saved)


# ------------------------------------------------------------------------------------ running
def latent_forward_backward(
    *,
    forward_step_func: Callable,
    data_iterator,
    model: List[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    num_jacobi_iters: int,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    **kwargs,
):
    """megatron's `forward_backward_func` for the latent model (same arguments plus the step's J):
    forward (and backward) of all passes of `num_microbatches` micro-batches; returns the loss
    dicts on the last stage. `model` is the list of (DDP-wrapped) stage modules."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not isinstance(model, (list, tuple)):
        model = [model]
    pp = ps.get_pipeline_model_parallel_world_size()
    stage = _unwrap(model[0])
    validate_stage_config(stage.config, seq_length)
    _validate_ddp(model)
    if stage.latent.num_latent_thoughts and num_jacobi_iters < 0:
        raise PipelineConfigError(f"--jacobi-iters: J must be >= 0, got {num_jacobi_iters}")
    common = dict(
        forward_step_func=forward_step_func, num_microbatches=num_microbatches,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data, **kwargs,
    )
    if pp == 1:
        validate_schedule(num_microbatches, 1, 1)
        return get_forward_backward_func(1, None)(
            data_iterator=data_iterator, model=list(model), seq_length=seq_length, **common
        )
    chunks = pass_chunks(model, num_jacobi_iters)
    num = len(chunks)
    validate_schedule(num_microbatches, pp, num, stage.config.microbatch_group_size_per_vp_stage)
    if isinstance(data_iterator, (list, tuple)):
        raise PipelineConfigError("latent_forward_backward takes one iterator over the step's micro-batches")
    # Every virtual chunk reads every micro-batch: lockstep copies of the one iterator.
    iterators = list(itertools.tee(data_iterator, num)) if num > 1 else data_iterator
    vp = num if num > 1 else None
    with _virtual_pipeline_size(vp):
        return get_forward_backward_func(pp, vp)(
            data_iterator=iterators, model=chunks,
            seq_length=max(pass_slots(stage.latent, num_jacobi_iters)) * seq_length, **common
        )


def masked_mean_loss(loss_mask, per_token):
    """Mean per-token loss over unmasked tokens of a micro-batch, and the dict the driver logs (a
    copy: the schedule divides the returned loss in place)."""
    per_token = per_token.float()
    if loss_mask is None:
        loss = per_token.mean()
    else:
        mask = loss_mask.float()
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"loss": loss.detach().clone()}


def latent_forward_step(num_jacobi_iters: Optional[int]):
    """A megatron forward_step_func over dict batches, for any layout (stage modules at PP=1,
    pass chunks at PP>1 share the call signature)."""

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(
            b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"],
            num_jacobi_iters=num_jacobi_iters,
        )
        return out, partial(masked_mean_loss, b.get("loss_mask"))

    return forward_step


def latent_train_step(model_chunks, optimizer, data_iterator, num_microbatches: int, seq_length: int,
                      micro_batch_size: int, num_jacobi_iters: int, forward_step_func: Optional[Callable] = None):
    """One optimizer step (engine.train_step) over the latent pipeline; returns engine.StepResult."""
    from megatron_latent.training import engine

    return engine.train_step(
        forward_step_func or latent_forward_step(num_jacobi_iters), data_iterator, model_chunks, optimizer,
        num_microbatches, seq_length, micro_batch_size,
        forward_backward_func=partial(latent_forward_backward, num_jacobi_iters=num_jacobi_iters),
    )


@torch.no_grad()
def latent_eval_loss(model_chunks, data_iterator, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, num_jacobi_iters: Optional[int] = None) -> Optional[float]:
    """Mean loss of `num_microbatches` micro-batches, forward only, in eval mode, with the fixed
    evaluation J (`jacobi_iters_eval`) unless given; averaged over data-parallel ranks. None off
    the last stage."""
    from megatron_latent.training import engine

    stage = _unwrap(model_chunks[0])
    j = stage.latent.jacobi_iters_eval if num_jacobi_iters is None else num_jacobi_iters
    j = j if stage.latent.num_latent_thoughts else 0
    modes = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()
    try:
        losses = latent_forward_backward(
            forward_step_func=latent_forward_step(j), data_iterator=data_iterator, model=model_chunks,
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            num_jacobi_iters=j, forward_only=True,
        )
    finally:
        for c, mode in zip(model_chunks, modes):
            c.train(mode)
    return engine.average_loss(losses)
