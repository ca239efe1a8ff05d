"""Tiny megatron models for the tests: the config builder (one per family), the weight generator
(deterministic weights large enough that every tensor moves the logits, the same full tensors
at any layout), the model holding them (gathered logits for comparisons, or split over TP as
inference builds it), token ids, the megatron reference forwards (one process, or a hand-run
pipeline), and the checkpoint writer.

The parallel training tests build their own smaller models (parallel_utils, pipeline_cases:
vocabulary 64, 16-token sequences) to keep the multi-rank suite fast."""

from __future__ import annotations

import zlib

import torch

VOCAB = 250  # padded to 256 on the megatron side; the export trims it
# The authors' training J ranges per family: GPT-NeoX torch.randint(2, 5), LLaMA torch.randint(2, 4).
THEIR_RANGE = {"gpt-neox": (2, 4), "llama": (2, 3), "gpt2": (2, 3)}

ARCHS = ["gpt2", "gpt-neox", "llama"]
L = 8


def small_config(arch: str, n: int, **overrides):
    from megatron_latent.config import get_preset

    preset = {"gpt2": "tiny-gpt2", "gpt-neox": "tiny-pythia", "llama": "tiny-llama"}[arch]
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
              seq_length=32, num_latent_thoughts=n, scale_embeddings=n > 0, name=f"t-{arch}-{n}")
    if arch == "llama":
        kw["num_query_groups"] = 2
    kw.update(overrides)
    return get_preset(preset).replace(**kw)


def full_weights(cfg, seed: int = 0):
    """Full (unsharded) megatron state dict of `cfg`, each tensor drawn from a generator seeded by
    its name: larger than the paper's init, so that thoughts, positions and padding visibly matter."""
    from megatron_latent.hf.layout import expected_shapes

    full = {}
    for name, shape in expected_shapes(cfg).items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        x = torch.randn(shape, generator=g)
        if "layernorm" in name:
            x = 1.0 + 0.2 * x if name.endswith("weight") else 0.2 * x
        elif len(shape) == 1:
            x = 0.2 * x
        else:
            x = x / shape[1] ** 0.5
        full[name] = x
    return full


def latent_model(cfg, full=None, **build):
    """This rank's LatentGPTModel of `cfg` (eval, gathered logits) holding its TP shard of `full`
    (default `full_weights`), split by the HF layout code, which knows the fused QKV / gated-MLP
    layouts: the same model at any TP. `build`: more build_gpt_model arguments (use_te=False)."""
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    build = {"parallel_output": False, **build}
    model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, **build)
    load_full_into_model(model, full_weights(cfg) if full is None else full, cfg)
    return model.eval()


def inference_model(arch: str, n: int, **overrides):
    """`latent_model` of `small_config(arch, n, **overrides)` as inference builds it (local layers,
    logits split over the TP ranks: generation gathers them itself)."""
    return latent_model(small_config(arch, n, **overrides), use_te=False, parallel_output=True)


def ids(batch: int = 2, seq: int = L, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def positions(tokens):
    """Position ids 0..L-1 of every row of `tokens` [b, L]."""
    return torch.arange(tokens.shape[1]).expand(tokens.shape).contiguous()


def megatron_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(tokens, positions(tokens), None, **kw)[..., :VOCAB]


def forward_pipeline(model, tokens):
    """`model`'s logits on the last pipeline stage (None on the others), by hand: each stage
    receives the previous stage's hidden states and sends its own on."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if rank > 0:
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, positions(tokens), None)
    if rank < pp - 1:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def save(model, cfg, root, iteration=0):
    import torch.distributed as dist

    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.training.checkpointing import save_checkpoint

    save_checkpoint(root, iteration, [model])
    if dist.get_rank() == 0:
        write_model_config(cfg, root)
