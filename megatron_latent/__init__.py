"""megatron-latent: GPT pretraining with latent thoughts in continuous space, on megatron-core.

Importing the package (or any module of it) has no side effects: the CPU backend that lets
megatron-core run without CUDA switches itself on at parallel start-up (see platform/)."""

__version__ = "0.1.0"
