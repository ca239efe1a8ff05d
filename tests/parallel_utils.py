"""Helpers for parallel-equivalence tests: tiny megatron GPT models, synthetic batches, and
gathering a sharded model's parameters or gradients into full, layout-independent tensors."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 64, 16, 32, 4, 4


def tiny_config(tp=1, pp=1, **overrides):
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
        # Pairing of unbatched send/recv is exact on gloo (see DESIGN.md section 3).
        batch_p2p_comm=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_gpt(config, position_embedding_type="rope", vp_stage=None, latent=None):
    """A tiny GPTModel for this rank's pipeline stage (and virtual stage `vp_stage`); a
    LatentGPTModel when `latent` (LatentSettings) is given."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kw = {} if vp_stage is None else {"ignore_virtual": False, "vp_stage": vp_stage}
    cls, extra = GPTModel, {}
    if latent is not None:
        from megatron_latent.models.latent import LatentGPTModel

        cls, extra = LatentGPTModel, {"latent": latent}
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_latent.models.norms import with_torch_norms

    spec = with_torch_norms(get_gpt_layer_local_spec(), get_num_layers_to_build(config, vp_stage=vp_stage))
    return cls(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(**kw),
        post_process=ps.is_pipeline_last_stage(**kw),
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
        **extra,
    )


def init_weights(chunks):
    """Deterministic weights keyed by global parameter name, so every layout starts from the same
    model: each full tensor is drawn from a generator seeded by its name, then this rank's TP
    shard is taken."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = _global_name(name, chunk)
            if key == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
                key = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            sharded = tp > 1 and getattr(p, "tensor_model_parallel", False)
            full_shape = list(p.shape)
            if sharded:
                full_shape[p.partition_dim] *= tp
            full = torch.randn(full_shape, generator=g) * 0.05
            if "norm" in name and name.endswith("weight"):
                full = 1.0 + full
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

    module = model.module if hasattr(model, "module") else model
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
