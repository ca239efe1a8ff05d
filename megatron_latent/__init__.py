"""megatron-latent: GPT pretraining with latent thoughts in continuous space, on megatron-core."""

__version__ = "0.1.0"
