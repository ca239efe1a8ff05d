"""Process-group and model-parallel start-up, with the checks that must fail before any collective.

A bad parallel layout (sizes that do not divide the world, more stages than layers) must stop every
rank at start-up with the same one-line error: all ranks evaluate the same pure check on the same
numbers, so none of them is left waiting in a collective for a peer that already died.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_latent import platform


class ParallelConfigError(ValueError):
    """An impossible parallel layout; the message names the offending flag."""


def validate_parallel_sizes(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
) -> int:
    """Check a parallel layout; return the data-parallel size."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for flag, v in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
    ):
        if v < 1:
            raise ParallelConfigError(f"{flag} must be >= 1, got {v}")
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp}"
        )
    if num_layers is not None:
        if pp > num_layers:
            raise ParallelConfigError(
                f"--pipeline-model-parallel-size {pp} is larger than --num-layers {num_layers}: "
                "every pipeline stage needs at least one layer"
            )
        if num_layers % pp != 0:
            raise ParallelConfigError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
            )
    if num_attention_heads is not None and num_attention_heads % tp != 0:
        raise ParallelConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
            f"{num_attention_heads}"
        )
    if num_query_groups is not None and num_query_groups % tp != 0:
        raise ParallelConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {num_query_groups}"
        )
    if virtual_pipeline_model_parallel_size is not None and virtual_pipeline_model_parallel_size < 1:
        raise ParallelConfigError(
            "--num-virtual-stages-per-pipeline-rank must be >= 1, got "
            f"{virtual_pipeline_model_parallel_size}"
        )
    return world_size // (tp * pp)


def init_process_group(timeout_minutes: int = 10) -> None:
    """Join the default process group from torchrun's environment (no-op if already joined)."""
    platform.install_cpu_backend()  # megatron runs from here on; inert with CUDA
    if dist.is_initialized():
        return
    backend = platform.distributed_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    seed: int = 1234,
) -> int:
    """Validate the layout, join the process group, build megatron's groups, seed the RNGs.

    Returns the data-parallel size. The world size is read from the environment (torchrun) when
    the process group does not exist yet, so a bad layout fails before any rendezvous.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    platform.install_cpu_backend()  # megatron runs from here on; inert with CUDA
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_parallel_sizes(
        world,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size,
        num_layers,
        num_attention_heads,
        num_query_groups,
    )
    init_process_group()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    # Same seed on every rank: weights are drawn whole and then split (use_cpu_initialization),
    # and megatron's tracker derives per-TP-rank streams for dropout from it.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return dp


def initialize_single_process(what: str) -> None:
    """Megatron's parallel state for tools that work on whole models in one process (conversion,
    export, generation): TP = PP = 1, in the existing process group or a gloo world of one that
    needs no launcher. `what` names the tool when the process group has other ranks."""
    import tempfile

    if not dist.is_initialized():
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"{what} runs as a single process (checkpoints reshard on load)")
    initialize_model_parallel(1, 1)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
