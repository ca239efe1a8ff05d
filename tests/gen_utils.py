"""Tiny latent models of the three families for the generation tests (same weights at any TP)."""

import torch

FAMILIES = ("tiny-gpt2", "tiny-pythia", "tiny-llama")
VOCAB = 256


def family_config(preset, n, **overrides):
    from megatron_latent.config import get_preset

    kw = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_latent_thoughts=n, scale_embeddings=bool(n))
    kw.update(overrides)
    return get_preset(preset, **kw)


def family_model(preset, n, **overrides):
    """LatentGPTModel (eval, fp32) for this rank's TP shard; weights keyed by global name."""
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from parallel_utils import init_weights

    cfg = family_config(preset, n, **overrides)
    model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent_settings(), use_te=False)
    init_weights([model])
    return model.eval()


def random_ids(b, length, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def positions(b, length):
    return torch.arange(length).expand(b, length).contiguous()
