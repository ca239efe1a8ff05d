"""Configuration: the model (`ModelConfig` with its `LatentSettings`), the parallel layout, presets.

Pure dataclasses validated once, at construction; megatron-core is imported only to build its
TransformerConfig. Errors are `ConfigError`s naming fields; the command line names its flags.
"""

from megatron_latent.config.errors import ConfigError
from megatron_latent.config.latent import LatentSettings
from megatron_latent.config.layout import ParallelLayout
from megatron_latent.config.model import ModelConfig, gelu_tanh
from megatron_latent.config.presets import PRESETS, describe_presets, get_preset

__all__ = [
    "ConfigError", "LatentSettings", "ModelConfig", "ParallelLayout", "PRESETS", "describe_presets", "get_preset",
    "gelu_tanh",
]
