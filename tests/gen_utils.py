"""Tiny latent models of the three families for the generation tests (same weights at any TP)."""

import torch

FAMILIES = ("tiny-gpt2", "tiny-pythia", "tiny-llama")
VOCAB = 256


def family_config(preset, n, **overrides):
    from megatron_latent.config import get_preset

    kw = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_latent_thoughts=n, scale_embeddings=bool(n))
    kw.update(overrides)
    return get_preset(preset, **kw)


def full_weights(cfg):
    """A full (unsharded) state dict for `cfg`, each tensor drawn from a generator seeded by its
    name: larger than the paper's init so that thoughts, positions and padding visibly matter."""
    from megatron_latent.hf.layout import expected_shapes
    from parallel_utils import draw

    return {
        name: draw(name, shape, center=1.0 if "norm" in name and name.endswith("weight") else 0.0)
        for name, shape in expected_shapes(cfg).items()
    }


def family_model(preset, n, **overrides):
    """LatentGPTModel (eval, fp32) holding this rank's TP shard of `full_weights` (split by the HF
    layout code, which knows the fused QKV / gated-MLP layouts: the same model at any TP)."""
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    cfg = family_config(preset, n, **overrides)
    model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False)
    load_full_into_model(model, full_weights(cfg), cfg)
    return model.eval()


def random_ids(b, length, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def positions(b, length):
    return torch.arange(length).expand(b, length).contiguous()
