"""The one error type of the configuration."""


class ConfigError(ValueError):
    """An impossible model, latent or parallel configuration. The message names the fields of
    ModelConfig, LatentSettings or ParallelLayout it is about (a command line shows its flags)."""


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
