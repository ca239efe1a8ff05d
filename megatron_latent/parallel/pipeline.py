"""Pipeline parallelism for the latent model: build the stages, run a step through megatron's schedules.

At PP=1 the latent model runs its own multi-pass forward (megatron's no-pipelining schedule). At
PP>1 every pass of the forward is a virtual pipeline chunk (see `parallel.passes`): a step with
J Jacobi iterations has P = len(latent.pass_slots(J)) passes (N + J + 1 with latent thoughts,
K + 1 with extra loops, one otherwise), and with the model's own interleaved layer chunks (v per
rank) V = P * v virtual chunks, run by megatron's interleaved schedule (its 1F1B schedule when
V = 1). Chunk k = p * v + j is pass p over layer chunk j.

    chunks = build_latent_pipeline(cfg)                          # this rank's stage module(s)
    losses = latent_forward_backward(forward_step_func=..., data_iterator=batches, model=chunks,
                                     num_microbatches=M, seq_length=L, micro_batch_size=b,
                                     num_jacobi_iters=J)          # megatron's forward_backward_func

`batches` is one iterator over this step's M micro-batches; every virtual chunk reads its own copy
of it, in lockstep. The optimizer step and evaluation around it live in training/engine.py.
Checkpoints (training/checkpointing.py) hold the stage modules' weights once, under megatron's
global keys, so they load at any other TP/PP.

Every method runs through the same pass chunks (pause tokens: one pass; extra loops: K+1). Only
interpolated thoughts need more: the first stage mixes embeddings by the output softmax, so it
needs the output layer's weight, which with untied embeddings (GPT-NeoX, LLaMA) lives on the last
stage only. It gets a mirror the way megatron keeps tied embeddings in sync across stages: a
parameter `thought_head` on the first stage, zero-filled and all-reduced with the last stage's
output layer over megatron's embedding group at build (so the two are equal), its gradient summed
with the output layer's over the same group after each finalize (so both take the same update),
marked `shared` (counted once in the gradient norm) and `shared_embedding` (its own DDP bucket,
sharded alike on both stages under the distributed optimizer), and checkpointed as a replica of
`output_layer.weight` (LatentGPTModel.sharded_state_dict): saved once, loaded from the output layer
at any layout. Weight decay and Adam see identical tensors and gradients, so the copies never drift.
"""

from __future__ import annotations

import collections
import copy
import itertools
from contextlib import contextmanager
from functools import partial
from typing import Callable, Deque, List, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_latent import platform
from megatron_latent.config import ConfigError, ModelConfig, ParallelLayout
from megatron_latent.models.gpt import build_gpt_model
from megatron_latent.models.latent import LatentGPTModel
from megatron_latent.models.transformer_config import to_transformer_config
from megatron_latent.parallel.passes import PassChunk, hand_off_length


# ------------------------------------------------------------------------------------ checks
def check_stage_config(config) -> None:
    """TransformerConfig features the pass wiring does not support (the layout itself is checked
    by config.ParallelLayout)."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ConfigError(
            "context_parallel_size > 1 is not supported by the latent model (the slot layout "
            "interleaves thoughts with tokens along the sequence that context parallelism splits)"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ConfigError("defer_embedding_wgrad_compute is not supported with the latent pipeline")


def _check_ddp(chunks) -> None:
    for c in chunks:
        ddp = getattr(c, "ddp_config", None)
        if ddp is None:
            continue
        if ddp.overlap_grad_reduce:
            # Every pass adds to the same gradient buffer; megatron's per-parameter "ready" count
            # is learned on the first step and the number of passes changes with J.
            raise ConfigError(
                "overlap_grad_reduce is not supported with the latent pipeline (each weight "
                "receives one gradient per pass, and the number of passes changes with J)"
            )
        if ddp.overlap_param_gather:
            raise ConfigError(
                "overlap_param_gather is not supported with the latent pipeline (the passes call "
                "the stage's layers directly, bypassing DDP's forward hooks)"
            )


# ------------------------------------------------------------------------------------ building
def build_latent_pipeline(cfg: ModelConfig, config=None, use_te: Optional[bool] = None) -> List[torch.nn.Module]:
    """This rank's stage module(s) of the latent model: one LatentGPTModel, or v of them when
    `config.virtual_pipeline_model_parallel_size` = v splits the layers into interleaved chunks.
    Wrap them in megatron DDP (engine.wrap_ddp) and build the optimizer over them."""
    if config is None:
        config = to_transformer_config(
            cfg,
            ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size())
    layout = ParallelLayout.of(config)  # checked against cfg when to_transformer_config made it
    check_stage_config(config)
    if layout.pipeline_model_parallel_size == 1:
        return [build_gpt_model(cfg, True, True, config=config, use_te=use_te, model_cls=LatentGPTModel,
                                latent=cfg.latent)]
    v = layout.virtual_chunks
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    chunks = [
        build_gpt_model(
            cfg, first and j == 0, last and j == v - 1, vp_stage=j if v > 1 else None, config=config,
            use_te=use_te, model_cls=LatentGPTModel, latent=cfg.latent, pipeline_stage=True,
        )
        for j in range(v)
    ]
    if cfg.latent.mixes_embeddings and not cfg.tie_embeddings:
        _mirror_output_layer(chunks)
    return chunks


# The first stage's copy of the output layer (interpolated thoughts, untied embeddings) and the
# output layer itself carry this attribute: their gradients are summed after each finalize.
_MIRRORED = "latent_thought_head_mirror"


def _mirror_output_layer(chunks) -> None:
    """Give the first stage the output layer's weight as `thought_head` (see the module docstring)."""
    pre = next((c for c in chunks if c.pre_process), None)
    post = next((c for c in chunks if c.post_process), None)
    if pre is None and post is None:
        return
    if pre is not None:
        emb = pre.embedding.word_embeddings.weight  # the output layer's shape: [V / tp, H]
        head = torch.nn.Parameter(torch.zeros_like(emb))
        tensor_parallel.set_tensor_model_parallel_attributes(head, True, 0, 1)
        head.shared = True  # a duplicate: counted once in the gradient norm, on the last stage
        head.is_embedding_or_output_parameter = True
        pre.thought_head = head
        weight = head
    else:
        weight = post.output_layer.weight
    weight.shared_embedding = True
    setattr(weight, _MIRRORED, True)
    torch.distributed.all_reduce(weight.data, group=ps.get_embedding_group())


def _sum_mirrored_grads(stages) -> None:
    """After megatron's finalize: the output layer and its first-stage copy both take the sum of
    their gradients (each has a full gradient only for its own use)."""
    for stage in unwrap_model(list(stages)):
        for param in stage.parameters():
            if getattr(param, _MIRRORED, False):
                grad = param.main_grad if hasattr(param, "main_grad") else param.grad
                torch.distributed.all_reduce(grad, group=ps.get_embedding_group())


def pass_chunks(model_chunks, num_jacobi_iters: int, passes: Optional[range] = None,
                thoughts_from: Optional[Deque[torch.Tensor]] = None) -> List[PassChunk]:
    """The virtual chunks of one schedule: pass p over layer chunk j is chunk (p - passes.start) * v + j.
    `passes`: the passes this schedule runs (default all); `thoughts_from` feeds its first pass when
    the pass before it ran in another schedule."""
    stages = unwrap_model(list(model_chunks))
    lengths = stages[0].latent.pass_slots(num_jacobi_iters)
    passes = range(len(lengths)) if passes is None else passes
    v, num = len(stages), len(passes) * len(stages)
    stage_config = stages[0].config
    config = copy.copy(stage_config)
    config.virtual_pipeline_model_parallel_size = num if num > 1 else None
    config.variable_seq_lengths = False  # fixed-shape messages, see parallel.passes
    if stage_config.finalize_model_grads_func is not None:
        # The schedule hands its model list (the pass chunks) to finalize; the gradients live in
        # the DDP-wrapped stages, once each.
        config.finalize_model_grads_func = partial(_finalize_stages, stage_config.finalize_model_grads_func,
                                                   list(model_chunks))
    return [PassChunk(model_chunks[j], p, lengths, config, (p - passes.start) * v + j,
                      thoughts_from if p == passes.start and j == 0 else None)
            for p in passes for j in range(v)]


def _finalize_stages(finalize, stages, _pass_chunks, num_tokens=None, **kwargs):
    # num_tokens: the step's target count for the per-token loss, summed by the schedule over the
    # loss_func calls, i.e. only the final pass's chunk on the last stage (the only one with a loss).
    result = finalize(stages, num_tokens, **kwargs)
    _sum_mirrored_grads(stages)
    return result


@contextmanager
def _virtual_pipeline_size(size: Optional[int]):
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
    if not isinstance(model, (list, tuple)):
        model = [model]
    stage = unwrap_model(model[0])
    layout = ParallelLayout.of(stage.config)
    layout.check_sequence_split(seq_length)
    check_stage_config(stage.config)
    _check_ddp(model)
    if num_jacobi_iters < 0:
        raise ConfigError(f"the number of Jacobi iterations must be >= 0, got {num_jacobi_iters}")
    common = dict(
        forward_step_func=forward_step_func, num_microbatches=num_microbatches,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data, **kwargs,
    )
    if layout.pipeline_model_parallel_size == 1:
        layout.check_schedule(num_microbatches, 1)
        return get_forward_backward_func(1, None)(
            data_iterator=data_iterator, model=list(model), seq_length=seq_length, **common
        )
    if isinstance(data_iterator, (list, tuple)):
        raise ValueError("latent_forward_backward takes one iterator over the step's micro-batches")
    total = len(stage.latent.pass_slots(num_jacobi_iters))
    without_grad = 0 if forward_only else stage.latent.passes_without_grad(num_jacobi_iters)
    for num in {without_grad, total - without_grad} - {0}:
        layout.check_schedule(num_microbatches, num * layout.virtual_chunks,
                              stage.config.microbatch_group_size_per_vp_stage)
    longest = hand_off_length(stage.latent, num_jacobi_iters, seq_length)
    thoughts = None
    if without_grad:
        # The passes without a graph run as a forward-only schedule of their own, so they cost no
        # backward slot and keep no activations; the last stage hands their final output to the
        # first stage, where the training schedule's first pass picks it up per micro-batch.
        batches = list(data_iterator)
        data_iterator = iter(batches)
        with torch.no_grad():
            outputs = _run_schedule(
                pass_chunks(model, num_jacobi_iters, range(without_grad)), iter(batches), longest,
                dict(common, forward_step_func=_keep_output(forward_step_func), forward_only=True))
        thoughts = _hand_to_first_stage(outputs, num_microbatches, model, longest, micro_batch_size)
    chunks = pass_chunks(model, num_jacobi_iters, range(without_grad, total), thoughts)
    return _run_schedule(chunks, data_iterator, longest, common)


def _run_schedule(chunks, data_iterator, seq_length: int, common: dict):
    """megatron's interleaved schedule over `chunks` (its 1F1B schedule for one chunk)."""
    num = len(chunks)
    # Every virtual chunk reads every micro-batch: lockstep copies of the one iterator.
    iterators = list(itertools.tee(data_iterator, num)) if num > 1 else data_iterator
    vp = num if num > 1 else None
    with _virtual_pipeline_size(vp):
        return get_forward_backward_func(ps.get_pipeline_model_parallel_world_size(), vp)(
            data_iterator=iterators, model=chunks, seq_length=seq_length, **common
        )


def _keep_output(forward_step_func):
    """The forward step of the passes without a graph: without a loss function, megatron's schedule
    keeps the last chunk's output (the hand-off of the last pass it runs) as it is."""

    def forward_step(data_iterator, model):
        output, _ = forward_step_func(data_iterator, model)
        return output, None

    return forward_step


def _hand_to_first_stage(outputs, num_microbatches: int, model, longest: int, micro_batch_size: int):
    """Send the kept outputs (one per micro-batch, on the last stage) to the first stage: a deque
    there, None elsewhere."""
    first, last = ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    config = unwrap_model(model[0]).config
    rows = longest // (config.tensor_model_parallel_size if config.sequence_parallel else 1)
    shape = (rows, micro_batch_size, config.hidden_size)
    group = ps.get_pipeline_model_parallel_group()
    peer_first = ps.get_pipeline_model_parallel_first_rank()
    peer_last = ps.get_pipeline_model_parallel_last_rank()
    if last:
        for out in outputs:
            torch.distributed.send(out.contiguous(), peer_first, group=group)
        return None
    if first:
        received = collections.deque()
        for _ in range(num_microbatches):
            t = torch.empty(shape, dtype=config.pipeline_dtype, device=platform.device())
            torch.distributed.recv(t, peer_last, group=group)
            received.append(t)
        return received
    return None
