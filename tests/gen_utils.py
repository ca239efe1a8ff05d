"""Tiny latent models of the three families at their presets' sizes, for the generation tests
(weights and model from tests/tiny.py: the same at any TP)."""

import torch

FAMILIES = ("tiny-gpt2", "tiny-pythia", "tiny-llama")
VOCAB = 256


def family_config(preset, n, **overrides):
    from megatron_latent.config import get_preset

    kw = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_latent_thoughts=n, scale_embeddings=bool(n))
    kw.update(overrides)
    return get_preset(preset, **kw)


def family_model(preset, n, **overrides):
    """LatentGPTModel (eval, fp32, local layers) of `family_config` holding this rank's TP shard
    of tiny.full_weights (the same model at any TP), its logits split over the TP ranks."""
    from tiny import latent_model

    return latent_model(family_config(preset, n, **overrides), use_te=False, parallel_output=True)


def random_ids(b, length, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def positions(b, length):
    return torch.arange(length).expand(b, length).contiguous()
