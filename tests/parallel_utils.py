"""Helpers for parallel-equivalence tests: tiny megatron GPT models, synthetic batches, and
gathering a sharded model's parameters or gradients into full, layout-independent tensors."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 64, 16, 32, 4, 4


def tiny_config(tp=1, pp=1, **overrides):
    """Sizes and parallel settings of a tiny model (a TransformerConfig; `tiny_gpt` builds from it)."""
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # On gloo, batched p2p paired messages between the same two ranks wrongly in the interleaved
        # schedule (the loss was off); unbatched send/recv pairs exactly, as the product does on CPU.
        batch_p2p_comm=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


# The product's family for each position embedding: GPT-NeoX (rotary, LayerNorm, biases, parallel
# residual, untied output layer) or GPT-2 (learned positions, tied embeddings).
FAMILY = {"rope": "gpt-neox", "learned_absolute": "gpt2"}
# What the test's TransformerConfig decides; architecture fields come from the family.
_CARRIED = ("sequence_parallel", "recompute_granularity", "recompute_method", "recompute_num_layers",
            "recompute_modules", "init_method", "output_layer_init_method")


def tiny_model_config(config, position_embedding_type="rope", latent=None):
    """The megatron_latent ModelConfig of `config`'s sizes in the family of `position_embedding_type`
    (with `latent` LatentSettings: a pause-token model's vocabulary has the pause row)."""
    from megatron_latent.config import ModelConfig

    arch = FAMILY[position_embedding_type]
    return ModelConfig(
        name=f"tiny-{arch}", arch=arch, num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
        ffn_hidden_size=config.ffn_hidden_size, vocab_size=VOCAB, make_vocab_size_divisible_by=VOCAB,
        seq_length=SEQ, **({} if latent is None else {"latent": latent}),
    )


def tiny_gpt(config, position_embedding_type="rope", vp_stage=None, latent=None):
    """This rank's pipeline stage (virtual stage `vp_stage`) of a tiny model built the product's
    way (build_gpt_model, local spec): a GPTModel, or a LatentGPTModel when `latent`
    (LatentSettings) is given. `config` gives the sizes, parallel layout, sequence parallelism,
    recomputation, dtype and init methods."""
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.transformer_config import to_transformer_config

    cfg = tiny_model_config(config, position_embedding_type, latent)
    tc = to_transformer_config(
        cfg,
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size,
        params_dtype=config.params_dtype,
        **{f: getattr(config, f) for f in _CARRIED},
    )
    if latent is None:
        return build_gpt_model(cfg, vp_stage=vp_stage, config=tc, use_te=False)
    from megatron_latent.models.latent import LatentGPTModel

    return build_gpt_model(cfg, vp_stage=vp_stage, config=tc, use_te=False, model_cls=LatentGPTModel, latent=latent)


def draw(key, shape, std=0.05, center=0.0):
    """The tests' one weight generator: center + N(0, std^2), from a generator seeded by `key` (a
    parameter's global name), so that every layout, shard and side (megatron, Hugging Face) holds
    the same full tensor."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return center + torch.randn(shape, generator=g) * std


def init_weights(chunks):
    """Weights from `draw` for this rank's model chunks, keyed by global parameter name, so every
    layout starts from the same model: each full tensor is drawn, then this rank's TP shard is taken."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = _global_name(name, chunk)
            if key == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
                key = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
            if key == "thought_head":
                key = "output_layer.weight"  # the first stage's copy of the output layer (interpolated)
            sharded = tp > 1 and getattr(p, "tensor_model_parallel", False)
            full_shape = list(p.shape)
            if sharded:
                full_shape[p.partition_dim] *= tp
            full = draw(key, full_shape, center=1.0 if "norm" in name and name.endswith("weight") else 0.0)
            if sharded and "linear_fc1" in name and chunk.config.gated_linear_unit:
                # megatron's gated fc1 shard is [gate_r; up_r], not row block r of [gate; up]
                gate, up = full.chunk(2, dim=0)
                full = torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
            elif sharded:
                full = full.chunk(tp, dim=p.partition_dim)[tp_rank]
            with torch.no_grad():
                p.copy_(full)


def batch(index, micro_batch_size=2, seq=SEQ):
    """Micro-batch `index` of a fixed synthetic stream: the same on every layout."""
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (micro_batch_size, seq + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(micro_batch_size, seq).contiguous(),
    }


def _global_name(name, module):
    """`decoder.layers.i.` (local index) -> global layer index, so layouts compare by name."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        layer = module.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def gather_full(model, grads=False):
    """{global name: full tensor} of a (DDP-wrapped) GPT model's parameters or gradients,
    all-gathered over tensor and pipeline parallel ranks (identical on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    module = unwrap_model(model)
    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in module.named_parameters():
        t = (p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else p.data
        t = t.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            if "linear_fc1" in name and module.config.gated_linear_unit:
                halves = [q.chunk(2, dim=0) for q in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
            else:
                t = torch.cat(parts, dim=p.partition_dim)
        out[_global_name(name, module)] = t
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages = [None] * pp
        dist.all_gather_object(stages, out, group=ps.get_pipeline_model_parallel_group())
        out = {}
        for s in stages:
            for k, v in s.items():
                # Tied embeddings live on the first and the last stage; both copies agree.
                out.setdefault(k, v)
    return out


def max_rel_diff(a: dict, b: dict):
    """Largest |a-b| / max|b| over common keys; asserts the key sets match."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        scale = b[k].abs().max().item() + 1e-12
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst
