"""megatron-latent: GPT pretraining with latent thoughts in continuous space, on megatron-core."""

from megatron_latent.platform import install_cpu_backend as _install_cpu_backend

__version__ = "0.1.0"

# Inert when CUDA is present; on CPU-only machines megatron-core needs it to run at all.
_install_cpu_backend()
