"""Process-group and model-parallel start-up, after the layout check that must fail before any collective.

A bad parallel layout (sizes that do not divide the world, more stages than layers) stops every
rank at start-up with the same one-line error (config.ParallelLayout): all ranks evaluate the same
pure check on the same numbers, so none of them is left waiting in a collective for a peer that
already died.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_latent import platform
from megatron_latent.config import ModelConfig, ParallelLayout


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
    seed: int = 1234,
    model: Optional[ModelConfig] = None,
    timeout_minutes: int = 10,
) -> int:
    """Check the layout (against `model` too, when given), join the process group, build megatron's
    groups, seed the RNGs. Returns the data-parallel size.

    The world size is read from the environment (torchrun) when the process group does not exist
    yet, so a bad layout fails on every rank before any rendezvous (ConfigError).
    """
    platform.install_cpu_backend()  # megatron runs from here on; inert with CUDA
    layout = ParallelLayout(tensor_model_parallel_size, pipeline_model_parallel_size,
                            virtual_pipeline_model_parallel_size)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = layout.data_parallel_size(world)
    if model is not None:
        layout.check_model(model)
    init_process_group(timeout_minutes)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.num_virtual_stages_per_pipeline_rank,
        distributed_timeout_minutes=timeout_minutes,
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
    if not dist.is_initialized():
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"{what} runs as a single process (checkpoints reshard on load)")
    ready = (parallel_state.model_parallel_is_initialized()
             and parallel_state.get_tensor_model_parallel_world_size() == 1
             and parallel_state.get_pipeline_model_parallel_world_size() == 1)
    if not ready:  # rebuilding would leave megatron's old groups (and their threads) behind
        initialize_model_parallel(1, 1)


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()
