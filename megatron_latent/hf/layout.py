"""Full (layout-free) megatron state dicts and their per-(pipeline, tensor)-rank shards.

The *full* state dict of a model is what a TP=1, PP=1 local-spec GPTModel holds: megatron names
with global layer numbers, `padded_vocab_size` rows in the embedding and output layer, no output
layer when embeddings are tied, no `_extra_state`. It is the same for every parallel layout,
which makes it the meeting point of checkpoints and Hugging Face conversion.

`shards[p][t]` is the `state_dict()` of the model part on pipeline stage p, tensor rank t. For
virtual pipelines, give pp = pipeline size x virtual stages and index chunk v of rank p as stage
v * pipeline_size + p (megatron's order). Tensor-parallel splits follow megatron's layers:
column-parallel weights by rows, row-parallel by columns, the vocabulary by rows, and the SwiGLU
fc1 = [gate; up] per rank (rank t holds [gate_t; up_t], so the full tensor is not the plain
concatenation of the shards).
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch

from megatron_latent.config import ModelConfig, ParallelLayout

StateDict = Dict[str, torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Transformer Engine fuses the norms into the next linear; map its names to the local ones.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_TE_NAMES_INV = {v: k for k, v in _TE_NAMES.items()}
# TP split dimension of each per-layer tensor (None: replicated).
_LAYER_SPLIT = {
    "input_layernorm.weight": None, "input_layernorm.bias": None,
    "pre_mlp_layernorm.weight": None, "pre_mlp_layernorm.bias": None,
    "self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1, "self_attention.linear_proj.bias": None,
    "mlp.linear_fc1.weight": 0, "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1, "mlp.linear_fc2.bias": None,
    # qk_layernorm: one norm of head width, the same on every rank.
    "self_attention.q_layernorm.weight": None, "self_attention.q_layernorm.bias": None,
    "self_attention.k_layernorm.weight": None, "self_attention.k_layernorm.bias": None,
}
_OTHER_SPLIT = {
    "embedding.word_embeddings.weight": 0,
    "embedding.position_embeddings.weight": None,
    "decoder.final_layernorm.weight": None,
    "decoder.final_layernorm.bias": None,
    "output_layer.weight": 0,
}


class CheckpointShapeError(ValueError):
    """A state dict that does not fit the model config; the message names the tensor."""


def expected_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """Names and shapes of the full state dict of `cfg`."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.query_groups) * d
    fc1 = 2 * f if cfg.gated else f
    ln = cfg.normalization == "LayerNorm"
    b = cfg.add_bias_linear
    layer = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
             "self_attention.linear_qkv.weight": (qkv, h),
             "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
             "mlp.linear_fc1.weight": (fc1, h), "mlp.linear_fc2.weight": (h, f)}
    if ln:
        layer.update({"input_layernorm.bias": (h,), "pre_mlp_layernorm.bias": (h,)})
    if b or cfg.add_qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (qkv,)
    if b:
        layer.update({"self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (fc1,),
                      "mlp.linear_fc2.bias": (h,)})
    if cfg.qk_layernorm:
        for qk in ("q", "k"):
            layer[f"self_attention.{qk}_layernorm.weight"] = (d,)
            if ln:
                layer[f"self_attention.{qk}_layernorm.bias"] = (d,)
    out = {"embedding.word_embeddings.weight": (cfg.padded_vocab_size, h)}
    if cfg.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (cfg.seq_length, h)
    for i in range(cfg.num_layers):
        out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    out["decoder.final_layernorm.weight"] = (h,)
    if ln:
        out["decoder.final_layernorm.bias"] = (h,)
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = (cfg.padded_vocab_size, h)
    return out


def check_full_state_dict(full: StateDict, cfg: ModelConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointShapeError naming the first missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in full]
    extra = [k for k in full if k not in want]
    if missing:
        raise CheckpointShapeError(
            f"{source}: tensor {missing[0]} is missing for model {cfg.name!r} ({len(missing)} missing)"
        )
    if extra:
        raise CheckpointShapeError(
            f"{source}: tensor {extra[0]} is not part of model {cfg.name!r} ({len(extra)} unexpected)"
        )
    for k, shape in want.items():
        if tuple(full[k].shape) != shape:
            raise CheckpointShapeError(
                f"{source}: tensor {k} has shape {tuple(full[k].shape)}, model {cfg.name!r} expects {shape}"
            )


def _split_dim(name: str):
    m = _LAYER.match(name)
    return _LAYER_SPLIT[m.group(2)] if m else _OTHER_SPLIT[name]


def _glu_to_shards(w: torch.Tensor, tp: int) -> List[torch.Tensor]:
    gate, up = w.chunk(2, dim=0)
    return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]


def _glu_from_shards(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    pairs = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([g for g, _ in pairs] + [u for _, u in pairs], dim=0)


def _is_glu_fc1(name: str, cfg: ModelConfig) -> bool:
    return cfg.gated and ".mlp.linear_fc1." in name


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> range:
    per = cfg.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def _canonical(name: str) -> str:
    m = _LAYER.match(name)
    if m and m.group(2) in _TE_NAMES:
        return f"decoder.layers.{m.group(1)}.{_TE_NAMES[m.group(2)]}"
    return name


def merge_tp_pp(shards: Sequence[Sequence[StateDict]], cfg: ModelConfig) -> StateDict:
    """Full state dict from `shards[pp_rank][tp_rank]` (local or TE names)."""
    pp, tp = len(shards), len(shards[0])
    ParallelLayout(tp, pp).check_model(cfg)
    full: StateDict = {}
    for p, row in enumerate(shards):
        if len(row) != tp:
            raise CheckpointShapeError(f"pipeline stage {p} has {len(row)} tensor-parallel shards, stage 0 has {tp}")
        offset = stage_layers(cfg, pp, p).start
        names = [k for k in row[0] if not k.endswith("_extra_state")]
        for name in names:
            key = _canonical(name)
            m = _LAYER.match(key)
            if m:
                key = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
            if key == "output_layer.weight" and cfg.tie_embeddings:
                continue  # the last stage's copy of the tied embedding
            parts = [row[t][name] for t in range(tp)]
            dim = _split_dim(key)
            if dim is None or tp == 1:
                full[key] = parts[0].detach().clone()
            elif _is_glu_fc1(key, cfg):
                full[key] = _glu_from_shards(parts)
            else:
                full[key] = torch.cat(parts, dim=dim)
    check_full_state_dict(full, cfg, source="merged shards")
    return full


def shard_for(full: StateDict, cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
              te_names: bool = False) -> StateDict:
    """The state dict of the model part at (pp_rank, tp_rank) of a TP x PP layout."""
    layers = stage_layers(cfg, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: StateDict = {}
    for key, t in full.items():
        m = _LAYER.match(key)
        if m:
            i = int(m.group(1))
            if i not in layers:
                continue
            sub = _TE_NAMES_INV.get(m.group(2), m.group(2)) if te_names else m.group(2)
            name = f"decoder.layers.{i - layers.start}.{sub}"
        elif key.startswith("embedding."):
            if not first:
                continue
            name = key
        else:  # final norm, output layer
            if not last:
                continue
            name = key
        out[name] = _take(t, key, cfg, tp, tp_rank)
    if last and cfg.tie_embeddings and not first:
        # megatron keeps a copy of the tied embedding as the last stage's output layer.
        out["output_layer.weight"] = _take(full["embedding.word_embeddings.weight"], "output_layer.weight",
                                           cfg, tp, tp_rank)
    return out


def _take(t: torch.Tensor, key: str, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    dim = _split_dim(key)
    if dim is None or tp == 1:
        return t.clone()
    if _is_glu_fc1(key, cfg):
        return _glu_to_shards(t, tp)[rank].clone()
    return t.chunk(tp, dim=dim)[rank].clone()


def split_tp_pp(full: StateDict, cfg: ModelConfig, tp: int, pp: int, te_names: bool = False) -> List[List[StateDict]]:
    """`shards[pp_rank][tp_rank]` of the full state dict (checked against `cfg` first)."""
    check_full_state_dict(full, cfg)
    ParallelLayout(tp, pp).check_model(cfg)
    return [[shard_for(full, cfg, tp, pp, t, p, te_names) for t in range(tp)] for p in range(pp)]


def load_full_into_model(model, full: StateDict, cfg: ModelConfig, pp_stage=None) -> None:
    """Load this rank's shard of `full` into `model` (a GPTModel built by build_gpt_model).

    `pp_stage` defaults to the pipeline rank (pass v * pp + p for virtual stage v).
    """
    from megatron.core import parallel_state as ps

    check_full_state_dict(full, cfg)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    vp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    stage = ps.get_pipeline_model_parallel_rank() if pp_stage is None else pp_stage
    te = any(k.endswith("layer_norm_weight") for k in model.state_dict())
    shard = shard_for(full, cfg, tp, pp * vp, ps.get_tensor_model_parallel_rank(), stage, te_names=te)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    for k, v in own.items():
        if k not in shard:
            raise CheckpointShapeError(f"checkpoint has no tensor for {k} of model {cfg.name!r}")
        if tuple(shard[k].shape) != tuple(v.shape):
            raise CheckpointShapeError(
                f"checkpoint tensor {k} has shape {tuple(shard[k].shape)}, model expects {tuple(v.shape)}"
            )
    unexpected = sorted(set(shard) - set(own))
    if unexpected:
        raise CheckpointShapeError(f"checkpoint tensor {unexpected[0]} has no place in model {cfg.name!r}")
    model.load_state_dict(shard, strict=False)
