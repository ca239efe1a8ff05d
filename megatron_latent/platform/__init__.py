"""Device choices (the device, the process-group backend, the TransformerConfig fields that depend
on the machine), and the CPU backend that lets megatron-core 0.16.1 run without CUDA.

The backend has two parts: the CUDA-to-CPU shim (``platform.cuda_to_cpu``: what megatron needs
to run at all without CUDA) and the CPU speed patches (``platform.cpu_speedups``: what makes its
GPU-less paths cost on the CPU what they cost on a GPU). :func:`install_cpu_backend` installs
both, on a machine without CUDA.

``torch.cuda.is_available()`` stays ``False``. Importing this package (or megatron_latent)
changes nothing: the backend switches itself on at parallel start-up (``parallel.initialize``),
the path every use of megatron's parallel state takes, and entry points that run megatron code
without it call :func:`install_cpu_backend` themselves. Tools that never reach megatron
(preprocessing, HF mapping) pay neither its import (~2 s) nor the mode's cost per torch call
(~1 us). With CUDA present it is never installed: on a GPU machine this package changes nothing.
It is the only place in the project that knows about this.
"""

from __future__ import annotations

import torch

from megatron_latent.platform import cpu_speedups, cuda_to_cpu
from megatron_latent.platform.cpu_speedups import fuse_optimizer

__all__ = [
    "cuda_available",
    "fuse_optimizer",
    "install_cpu_backend",
    "cpu_backend_installed",
    "device",
    "distributed_backend",
    "transformer_config_device_fields",
]


def cuda_available() -> bool:
    """True when a CUDA device can be used (the real check, unaffected by the backend)."""
    return torch.cuda.is_available()


def cpu_backend_installed() -> bool:
    return cuda_to_cpu.installed()


def device() -> torch.device:
    """The device this process computes on: the local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def transformer_config_device_fields() -> dict:
    """The TransformerConfig fields that depend on the device (models/transformer_config.py)."""
    return dict(
        # Every weight drawn whole from torch's CPU generator, then split, also on GPUs (build_gpt_model
        # moves the model there): the same model at every TP size, and with models.seeding's
        # per-layer streams at every PP size. megatron's GPU path would draw each shard from the
        # CUDA RNG tracker's per-TP-rank stream instead.
        use_cpu_initialization=True,
        # gloo pairs batched p2p messages between the same two ranks wrongly (the loss of an
        # interleaved pipeline was off); unbatched sends pair exactly.
        batch_p2p_comm=cuda_available(),
    )


def install_cpu_backend() -> bool:
    """Install the CPU backend if CUDA is absent. Idempotent; returns whether it is installed."""
    if cuda_to_cpu.installed():
        return True
    if cuda_available():
        return False
    cuda_to_cpu.install()
    cpu_speedups.install()
    return True
