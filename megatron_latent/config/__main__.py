"""`python -m megatron_latent.config`: list the presets."""

from megatron_latent.config.presets import describe_presets

print(describe_presets())
