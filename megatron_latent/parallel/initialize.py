"""Process-group and model-parallel start-up, after the layout check that must fail before any collective.

One start-up path: `init_process_group` joins torchrun's world (its environment: WORLD_SIZE,
RANK, MASTER_ADDR, ...), else makes a world of one process whose rendezvous is a file (no port
has to be free); `destroy_process_group` undoes it, temporary directory included. Training,
the single-process tools and the tests all start this way.

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
from megatron_latent.config import ConfigError, ModelConfig, ParallelLayout

# The default group this module created (None: none, or the caller's own), and the temporary
# directory holding a world of one's rendezvous file.
_created: Optional[dist.ProcessGroup] = None
_rendezvous: Optional[tempfile.TemporaryDirectory] = None


def launched() -> bool:
    """Whether a launcher (torchrun) set up this process's world."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    """The size of the world this process is in, or will join."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(timeout_minutes: int = 10, backend: Optional[str] = None) -> bool:
    """Join the default process group: torchrun's when launched by it, else a world of one.
    Installs the CPU backend first (megatron runs from here on; inert with CUDA). `backend`
    defaults to the platform's (NCCL on GPUs, gloo on CPUs). Returns whether this call created
    the group; an existing one is kept as it is."""
    global _created, _rendezvous
    platform.install_cpu_backend()
    if dist.is_initialized():
        return False
    backend = backend or platform.distributed_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launched():
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        _rendezvous = tempfile.TemporaryDirectory(prefix="megatron_latent_rendezvous_")
        dist.init_process_group(backend, init_method=f"file://{_rendezvous.name}/store", rank=0, world_size=1,
                                timeout=timeout)
    _created = dist.group.WORLD
    return True


def destroy_process_group() -> None:
    """Undo `init_process_group`: megatron's groups, then the default group and the rendezvous
    directory if `init_process_group` made them (a caller's own process group is left as it is)."""
    global _created, _rendezvous
    parallel_state.destroy_model_parallel()
    if _created is not None and dist.is_initialized() and dist.group.WORLD is _created:
        dist.destroy_process_group()  # the default group and every other one
    _created = None
    if _rendezvous is not None:
        _rendezvous.cleanup()
        _rendezvous = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    model: Optional[ModelConfig] = None,
    timeout_minutes: int = 10,
) -> int:
    """Check the layout (against `model` too, when given; a caller that checked it already passes
    none), join the process group, build megatron's groups, seed the RNGs. Returns the
    data-parallel size.

    The world size is read from the environment (torchrun) when the process group does not exist
    yet, so a bad layout fails on every rank before any rendezvous (ConfigError).
    """
    platform.install_cpu_backend()  # megatron runs from here on; inert with CUDA
    layout = ParallelLayout(tensor_model_parallel_size, pipeline_model_parallel_size,
                            virtual_pipeline_model_parallel_size)
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if model_parallel > 1 and not dist.is_initialized() and not launched():
        raise ConfigError(
            f"tensor_model_parallel_size {tensor_model_parallel_size} x pipeline_model_parallel_size "
            f"{pipeline_model_parallel_size} needs {model_parallel} processes (or a multiple): launch with "
            f"torchrun --nproc_per_node {model_parallel}")
    dp = layout.data_parallel_size(world_size())
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
    # Same seed on every rank: the model's weights derive from it (models.seeding: drawn whole,
    # per layer, the same at any layout), and megatron's tracker derives per-TP-rank streams for
    # dropout from it.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return dp


def initialize_single_process(what: str) -> None:
    """Megatron's parallel state for tools that work on whole models in one process (conversion,
    export, generation): TP = PP = 1, in the existing process group or a gloo world of one
    (`init_process_group`). `what` names the tool when the process group has other ranks."""
    init_process_group(backend="gloo")
    if dist.get_world_size() != 1:
        raise RuntimeError(f"{what} runs as a single process (checkpoints reshard on load)")
    ready = (parallel_state.model_parallel_is_initialized()
             and parallel_state.get_tensor_model_parallel_world_size() == 1
             and parallel_state.get_pipeline_model_parallel_world_size() == 1)
    if not ready:  # rebuilding would leave megatron's old groups (and their threads) behind
        initialize_model_parallel(1, 1)


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()
