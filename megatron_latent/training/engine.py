"""One training step on megatron-core: DDP-wrapped model chunks, its optimizer, its schedules.

The pieces a training driver needs, free of flags and files: wrap model chunks in megatron's
DistributedDataParallel, build the optimizer with `get_megatron_optimizer`, and run one step
(forward/backward over all micro-batches with `get_forward_backward_func()`, gradient
finalisation, optimizer step, loss averaged over the data-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    loss: Optional[float]  # mean over micro-batches and data-parallel ranks; None off the last stage
    grad_norm: Optional[float]  # over all ranks (the same on every rank)


def wrap_ddp(model_chunks: List[torch.nn.Module], ddp_config=None):
    """Wrap each chunk in megatron DDP (one contiguous gradient buffer per chunk)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = ddp_config or DistributedDataParallelConfig()
    wrapped = []
    for i, m in enumerate(model_chunks):
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
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(optimizer_config, model_chunks)


def configure_model_for_training(model_chunks, optimizer) -> None:
    """Hook the schedule up to DDP and the optimizer, as megatron's training loop does."""
    from megatron.core.distributed import finalize_model_grads

    for m in model_chunks:
        cfg = m.config
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
    pipeline passes its own (parallel.pipeline.latent_forward_backward), same arguments."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

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
    """Mean of the micro-batch losses on the last stage, averaged over data-parallel ranks."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    values = [float(d[key]) for d in losses]
    from megatron_latent import platform

    # On the current device: NCCL reduces only CUDA tensors.
    local = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=platform.device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return float(local[0] / local[1])
