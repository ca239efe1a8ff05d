"""One training step on megatron-core: DDP-wrapped model chunks, its optimizer, its schedules.

The pieces a training driver needs, free of flags and files: wrap model chunks in megatron's
DistributedDataParallel, build the optimizer with `get_megatron_optimizer`, and run one step
(forward/backward over all micro-batches with a megatron schedule, gradient finalisation,
optimizer step, loss averaged over the data-parallel group). `latent_train_step` and
`latent_eval_loss` run the latent model on any layout through parallel.pipeline's schedule.

The loss of a step is megatron-core's per-token loss (`calculate_per_token_loss`): the sum of the
token losses of the global batch divided by its number of unmasked targets, so a micro-batch or a
data-parallel rank with fewer targets (EOD masking, padding) weighs less, not more. Every
loss_func returns megatron's triple (`token_loss`); the schedules sum the token counts and
finalize_model_grads divides the gradients by the global count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_latent import compat, platform
from megatron_latent.parallel.pipeline import latent_forward_backward


@dataclass
class StepResult:
    loss: Optional[float]  # token-weighted mean over the global batch; None off the last stage
    grad_norm: Optional[float]  # over all ranks (the same on every rank)


def wrap_ddp(model_chunks: List[torch.nn.Module], ddp_config=None):
    """Wrap each chunk in megatron DDP (one contiguous gradient buffer per chunk), for the
    per-token loss."""
    ddp_config = ddp_config or DistributedDataParallelConfig()
    wrapped = []
    for i, m in enumerate(model_chunks):
        # Set here, not in configure_model_for_training: DDP fixes its gradient scaling on
        # construction from this flag (a plain sum over DP instead of 1/DP; finalize_model_grads
        # then divides by the global token count). The schedules read it from the same config.
        m.config.calculate_per_token_loss = True
        wrapped.append(
            DistributedDataParallel(
                m.config,
                ddp_config,
                m,
                # Only the first chunk's buffer may be overlapped with the backward of the rest.
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def build_optimizer(model_chunks, optimizer_config):
    optimizer = get_megatron_optimizer(optimizer_config, model_chunks)
    compat.mark_decoupled_lr_groups(optimizer)  # before any save: it identifies the group on load
    platform.fuse_optimizer(optimizer)
    return optimizer


def configure_model_for_training(model_chunks, optimizer) -> None:
    """Hook the schedule up to DDP and the optimizer, as megatron's training loop does."""
    for m in model_chunks:
        cfg = m.config
        if not cfg.calculate_per_token_loss:
            raise ValueError("model chunks must be wrapped with engine.wrap_ddp (per-token loss)")
        cfg.grad_scale_func = optimizer.scale_loss
        cfg.finalize_model_grads_func = finalize_model_grads
        syncs = [c.no_sync for c in model_chunks]
        cfg.no_sync_func = syncs if len(syncs) > 1 else syncs[0]


def train_step(
    forward_step_func: Callable,
    data_iterator,
    model_chunks: List[torch.nn.Module],
    optimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_backward_func: Optional[Callable] = None,
) -> StepResult:
    """`forward_backward_func`: megatron's schedule for the current layout by default; the latent
    model's is parallel.pipeline.latent_forward_backward (see latent_train_step)."""
    for m in model_chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = (forward_backward_func or get_forward_backward_func())(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    # Without fp16 loss scaling (not supported here) megatron's optimizer never skips a step, even
    # on non-finite gradients: the caller checks the returned norm and loss (training.loop stops
    # without saving).
    _, grad_norm, _ = optimizer.step()
    return StepResult(loss=average_loss(losses), grad_norm=grad_norm)


def average_loss(losses: Iterable[dict], key: str = "loss") -> Optional[float]:
    """Token-weighted mean loss of the global batch: the [loss sum, tokens] pairs of the
    micro-batches (`token_loss`) summed on the last stage and over data-parallel ranks, then
    divided. None off the last stage."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    # On the current device: NCCL reduces only CUDA tensors.
    local = torch.zeros(2, dtype=torch.float64, device=platform.device())
    for d in losses:
        pair = d[key]
        if not torch.is_tensor(pair) or pair.numel() != 2:
            raise ValueError(f"loss dict entry {key!r} must be the pair [loss sum, tokens] (engine.token_loss), "
                             f"got {pair!r}")
        local += pair.detach().reshape(2).to(local)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return float(local[0] / local[1].clamp(min=1.0))


def token_loss(loss_mask, per_token):
    """megatron's per-token loss_func triple for one micro-batch: the sum of the token losses over
    unmasked targets, their number (int, summed by the schedule for finalize_model_grads), and the
    logged pair [sum, number] that average_loss reduces."""
    per_token = per_token.float()
    if loss_mask is None:
        total = per_token.sum()
        num_tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
    else:
        mask = loss_mask.to(per_token.dtype).view_as(per_token)
        total = (per_token * mask).sum()
        num_tokens = mask.sum().to(torch.int)
    return total, num_tokens, {"loss": torch.stack([total.detach(), num_tokens.to(total.dtype)])}


# ------------------------------------------------------------------------------ the latent model
def latent_forward_step(num_jacobi_iters: Optional[int]):
    """A megatron forward_step_func over dict batches (tokens, labels, position_ids, optional
    attention_mask and loss_mask), for any layout: stage modules at PP=1 and pass chunks at PP>1
    share the call signature."""

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(
            b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"],
            num_jacobi_iters=num_jacobi_iters,
        )
        return out, partial(token_loss, b.get("loss_mask"))

    return forward_step


def latent_train_step(model_chunks, optimizer, data_iterator, num_microbatches: int, seq_length: int,
                      micro_batch_size: int, num_jacobi_iters: int, forward_step_func: Optional[Callable] = None):
    """One optimizer step of the latent model (any layout) with J = `num_jacobi_iters`, the same
    on every rank; returns StepResult."""
    return train_step(
        forward_step_func or latent_forward_step(num_jacobi_iters), data_iterator, model_chunks, optimizer,
        num_microbatches, seq_length, micro_batch_size,
        forward_backward_func=partial(latent_forward_backward, num_jacobi_iters=num_jacobi_iters),
    )


@torch.no_grad()
def latent_eval_loss(model_chunks, data_iterator, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, num_jacobi_iters: Optional[int] = None) -> Optional[float]:
    """Token-weighted mean loss of `num_microbatches` micro-batches on every data-parallel rank,
    forward only, in eval mode, with the fixed evaluation J (`jacobi_iters_eval`) unless given.
    None off the last stage."""
    latent = unwrap_model(model_chunks[0]).latent
    j = latent.jacobi_iters_eval if num_jacobi_iters is None else num_jacobi_iters
    j = j if latent.num_latent_thoughts else 0
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
    return average_loss(losses)
