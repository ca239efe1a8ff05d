"""Configuration: the model (`ModelConfig` with its `LatentSettings`), the parallel layout, presets.

Pure dataclasses validated once, at construction; neither torch nor megatron-core is imported here
(the bridge to megatron-core's TransformerConfig is models/transformer_config.py). Errors are
`ConfigError`s naming fields; the command line names its flags.
"""

from megatron_latent.config.errors import ConfigError
from megatron_latent.config.latent import LatentSettings
from megatron_latent.config.layout import ParallelLayout
from megatron_latent.config.model import ModelConfig
from megatron_latent.config.presets import PRESETS, describe_presets, get_preset

__all__ = [
    "ConfigError", "LatentSettings", "ModelConfig", "ParallelLayout", "PRESETS", "describe_presets", "get_preset",
]
