"""Weights and configs between our full megatron state dict and Hugging Face causal LMs.

Supported: GPT2LMHeadModel (model_type gpt2), GPTNeoXForCausalLM (gpt_neox), LlamaForCausalLM
(llama, Llama-3.x's rope scaling included), Qwen2ForCausalLM (qwen2: Qwen2.5) and Qwen3ForCausalLM
(qwen3). The last three share LLaMA's tensor names; Qwen2 adds q/k/v biases, Qwen3 the per-head
`q_norm`/`k_norm` (megatron's `q_layernorm`/`k_layernorm`).

`megatron_to_hf` / `hf_to_megatron` work on full state dicts (see `layout`), the state of a TP=1,
PP=1 model: export and conversion run as a world of one and megatron `dist_checkpointing`
reshards the checkpoint to and from any parallel layout.

QKV layouts. megatron-core stores linear_qkv per query group: for group g, the rows of its
nq/ng query heads, then its key head, then its value head. GPT-NeoX's query_key_value is per head
[q_h; k_h; v_h] - the same thing with one head per group. GPT-2's c_attn (a Conv1D, stored
transposed) is [all q; all k; all v]. LLaMA has separate q/k/v projections.
SwiGLU: megatron fc1 = [gate; up] (LLaMA gate_proj, up_proj). Vocabulary: the HF side holds
`cfg.vocab_size` rows, ours `cfg.padded_vocab_size`; import pads with zero rows, export trims.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from megatron_latent.config import ModelConfig
from megatron_latent.config.model import LLAMA_LIKE
from megatron_latent.hf.authors import latent_from_hf
from megatron_latent.hf.layout import CheckpointShapeError, StateDict, check_full_state_dict

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ARCH_OF = {"gpt2": "gpt2", "gpt_neox": "gpt-neox", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# megatron-core's llama3 rope scaling fixes these (RotaryEmbedding._apply_scaling); only the factor varies.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedArchitectureError(ValueError):
    pass


def _unsupported(what: str) -> UnsupportedArchitectureError:
    names = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
    return UnsupportedArchitectureError(f"unsupported architecture {what}; supported: {names}")


# ------------------------------------------------------------------------------------ configs
def base_model_type(model_type):
    """The stock model type of our latent exports (`latent_llama` -> `llama`), else unchanged."""
    if isinstance(model_type, str) and model_type.startswith("latent_") and model_type[7:] in SUPPORTED:
        return model_type[7:]
    return model_type


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """Our ModelConfig of an HF config (`overrides` replace fields, e.g. num_latent_thoughts). The
    latent keys are read in the authors' meaning (hf/authors.py); configs we cannot run are refused."""
    mt = base_model_type(getattr(hf_config, "model_type", None))
    if mt not in SUPPORTED:
        arch = (getattr(hf_config, "architectures", None) or [None])[0]
        raise _unsupported(f"{arch or mt!r} (model_type {mt!r})")
    c = hf_config
    name = os.path.basename(str(getattr(c, "_name_or_path", "") or "").rstrip("/")) or f"hf-{mt}"
    if mt == "gpt2":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(c.activation_function)
        if act is None:
            raise _unsupported(f"GPT-2 with activation_function {c.activation_function!r} (gelu_new, gelu)")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            raise _unsupported("GPT-2 with non-standard attention scaling")
        kw = dict(arch="gpt2", num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
                  ffn_hidden_size=c.n_inner or 4 * c.n_embd, vocab_size=c.vocab_size, seq_length=c.n_positions,
                  norm_epsilon=c.layer_norm_epsilon, activation=act, tie_embeddings=True)
    elif mt == "gpt_neox":
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(c.hidden_act)
        if act is None:
            raise _unsupported(f"GPT-NeoX with hidden_act {c.hidden_act!r} (gelu, gelu_new)")
        if not getattr(c, "attention_bias", True):
            # HF keeps MLP biases then; megatron's add_bias_linear covers attention and MLP together.
            raise _unsupported("GPT-NeoX with attention_bias=False")
        rope = _rope(c)
        kw = dict(arch="gpt-neox", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                  num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.intermediate_size,
                  vocab_size=c.vocab_size, seq_length=c.max_position_embeddings, norm_epsilon=c.layer_norm_eps,
                  rotary_percent=rope.get("partial_rotary_factor", 1.0), rotary_base=rope["rope_theta"],
                  activation=act, tie_embeddings=bool(c.tie_word_embeddings),
                  parallel_residual=bool(c.use_parallel_residual))
    else:
        family = {"llama": "LLaMA", "qwen2": "Qwen2", "qwen3": "Qwen3"}[mt]
        if c.hidden_act != "silu":
            raise _unsupported(f"{family} with hidden_act {c.hidden_act!r} (silu)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if mt != "qwen3" and head_dim * c.num_attention_heads != c.hidden_size:
            raise _unsupported(f"{family} with head_dim {head_dim} != hidden_size / num_attention_heads")
        if getattr(c, "use_sliding_window", False):
            raise _unsupported(f"{family} with use_sliding_window (sliding-window attention)")
        bias = bool(getattr(c, "attention_bias", False))
        if mt == "llama" and bias != bool(getattr(c, "mlp_bias", False)):
            raise _unsupported("LLaMA with attention_bias != mlp_bias")
        if mt == "qwen3" and bias:
            # q/k/v/o biases without MLP biases: megatron's add_bias_linear covers both.
            raise _unsupported("Qwen3 with attention_bias")
        rope = _rope(c, scaling=mt == "llama")
        kw = dict(arch=_ARCH_OF[mt], num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                  num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
                  ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
                  seq_length=c.max_position_embeddings, norm_epsilon=c.rms_norm_eps,
                  rotary_percent=rope.get("partial_rotary_factor", 1.0), rotary_base=rope["rope_theta"],
                  tie_embeddings=bool(c.tie_word_embeddings))
        if mt == "llama":
            kw.update(add_bias_linear=bias, add_qkv_bias=bias)
        if rope.get("rope_type") == "llama3":
            kw.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
        if mt == "qwen3":
            kw["kv_channels"] = head_dim
    kw["name"] = name
    return ModelConfig(**kw).replace(**{**latent_from_hf(c, kw["arch"]), **overrides})


def _rope(c, scaling: bool = False) -> Dict:
    """The RoPE parameters of an HF config (5.x `rope_parameters`, 4.x `rope_theta`/`rope_scaling`);
    besides default RoPE, `scaling` admits the llama3 type megatron-core computes."""
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3" and scaling:
        other = {k: rope.get(k) for k, v in LLAMA3_ROPE_FIXED.items() if rope.get(k) != v}
        if other or not rope.get("factor") or rope["factor"] < 1:
            bad = ", ".join(f"{k} {v}" for k, v in {**other, "factor": rope.get("factor")}.items())
            raise _unsupported(f"{c.model_type} with llama3 rope scaling {bad} (megatron-core computes factor >= 1 "
                               f"with {', '.join(f'{k} {v:g}' for k, v in LLAMA3_ROPE_FIXED.items())} only)")
    elif kind != "default":
        extra = " or llama3" if scaling else ""
        raise _unsupported(f"{c.model_type} with rope_type {kind!r} (only default RoPE{extra})")
    rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    return rope


def config_to_hf(cfg: ModelConfig):
    """The stock HF config (a transformers PretrainedConfig) of our ModelConfig; the latent keys are
    added by the export (hf/authors.py)."""
    import transformers as tf

    if cfg.family_departures():
        raise _unsupported(f"{cfg.arch} with {', '.join(cfg.family_departures())} (not in its Hugging Face class)")
    common = dict(vocab_size=cfg.embedding_rows, tie_word_embeddings=cfg.tie_embeddings,
                  architectures=[SUPPORTED[_hf_type(cfg)]])
    if cfg.arch == "gpt2":
        if cfg.activation == "swiglu":
            raise _unsupported("gpt2 with swiglu")
        hc = tf.GPT2Config(n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                           n_inner=cfg.ffn_hidden_size, n_positions=cfg.seq_length,
                           layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=cfg.hidden_dropout,
                           embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
                           activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu", **common)
    elif cfg.arch == "gpt-neox":
        hc = tf.GPTNeoXConfig(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                              num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_hidden_size,
                              max_position_embeddings=cfg.seq_length, layer_norm_eps=cfg.norm_epsilon,
                              hidden_act="gelu" if cfg.activation == "gelu" else "gelu_new",
                              use_parallel_residual=cfg.parallel_residual, attention_bias=True,
                              hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
                              rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base,
                                               "partial_rotary_factor": cfg.rotary_percent}, **common)
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
        if cfg.rope_scaling:
            rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, **LLAMA3_ROPE_FIXED)
        kw = dict(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
                  intermediate_size=cfg.ffn_hidden_size, max_position_embeddings=cfg.seq_length,
                  rms_norm_eps=cfg.norm_epsilon, attention_dropout=cfg.attention_dropout, rope_parameters=rope)
        if cfg.arch == "llama":
            hc = tf.LlamaConfig(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear, **kw, **common)
        elif cfg.arch == "qwen2":
            hc = tf.Qwen2Config(use_sliding_window=False, **kw, **common)
        else:
            if not hasattr(tf, "Qwen3Config"):
                raise _unsupported(f"qwen3 with transformers {tf.__version__} (Qwen3 needs transformers >= 4.51)")
            hc = tf.Qwen3Config(head_dim=cfg.head_dim, attention_bias=False, use_sliding_window=False, **kw, **common)
    return hc


def _hf_type(cfg: ModelConfig) -> str:
    return {"gpt2": "gpt2", "gpt-neox": "gpt_neox"}.get(cfg.arch, cfg.arch)


# ------------------------------------------------------------------------------- QKV layouts
def _qkv_from_heads(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    """megatron linear_qkv rows (or bias) from q [nq*d, ...], k/v [ng*d, ...]."""
    ng, d = cfg.query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_to_heads(w: torch.Tensor, cfg: ModelConfig):
    ng, d = cfg.query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    rest = w.shape[1:]
    g = w.reshape(ng, (per + 2) * d, *rest)
    q, k, v = g.split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_rows(w: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if w.shape[0] > rows:
        raise CheckpointShapeError(f"{name} has {w.shape[0]} rows, more than the padded vocabulary {rows}")
    if w.shape[0] == rows:
        return w.clone()
    # Padding rows are never looked up; as output rows they give logit 0 for padding ids.
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], dim=0)


# ------------------------------------------------------------------------------ state dicts
def _layer_pairs(cfg: ModelConfig):
    """(HF suffix, megatron suffix, transpose) of the per-layer tensors mapped one to one."""
    if cfg.arch == "gpt2":
        return [("ln_1.weight", "input_layernorm.weight", False), ("ln_1.bias", "input_layernorm.bias", False),
                ("ln_2.weight", "pre_mlp_layernorm.weight", False), ("ln_2.bias", "pre_mlp_layernorm.bias", False),
                ("attn.c_proj.weight", "self_attention.linear_proj.weight", True),
                ("attn.c_proj.bias", "self_attention.linear_proj.bias", False),
                ("mlp.c_fc.weight", "mlp.linear_fc1.weight", True), ("mlp.c_fc.bias", "mlp.linear_fc1.bias", False),
                ("mlp.c_proj.weight", "mlp.linear_fc2.weight", True), ("mlp.c_proj.bias", "mlp.linear_fc2.bias", False)]
    if cfg.arch == "gpt-neox":
        pairs = [("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "pre_mlp_layernorm"),
                 ("attention.query_key_value", "self_attention.linear_qkv"),
                 ("attention.dense", "self_attention.linear_proj"),
                 ("mlp.dense_h_to_4h", "mlp.linear_fc1"), ("mlp.dense_4h_to_h", "mlp.linear_fc2")]
        return [(f"{a}.{p}", f"{b}.{p}", False) for a, b in pairs for p in ("weight", "bias")]
    pairs = [("input_layernorm.weight", "input_layernorm.weight", False),
             ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", False),
             ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", False),
             ("mlp.down_proj.weight", "mlp.linear_fc2.weight", False)]
    if cfg.add_bias_linear:
        pairs += [("self_attn.o_proj.bias", "self_attention.linear_proj.bias", False),
                  ("mlp.down_proj.bias", "mlp.linear_fc2.bias", False)]
    if cfg.qk_layernorm:  # Qwen3: RMSNorm over each head's queries / keys
        pairs += [("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", False),
                  ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", False)]
    return pairs


def _names(cfg: ModelConfig):
    """HF names of: layer prefix, embedding, position embedding, final norm prefix, head."""
    if cfg.arch in LLAMA_LIKE:
        return "model.layers.", "model.embed_tokens.weight", None, "model.norm.", "lm_head.weight"
    return {
        "gpt2": ("transformer.h.", "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.",
                 "lm_head.weight"),
        "gpt-neox": ("gpt_neox.layers.", "gpt_neox.embed_in.weight", None, "gpt_neox.final_layer_norm.", _neox_head()),
    }[cfg.arch]


def _neox_head() -> str:
    """GPT-NeoX's output layer: `embed_out` up to transformers 4, `lm_head` from 5 (which renames
    `embed_out` when loading Hub checkpoints such as Pythia's)."""
    import transformers

    return "lm_head.weight" if int(transformers.__version__.split(".")[0]) >= 5 else "embed_out.weight"


def megatron_to_hf(full: StateDict, cfg: ModelConfig) -> Tuple[StateDict, object]:
    """(HF state dict, HF config) of a full megatron state dict. The vocabulary is trimmed to
    `cfg.embedding_rows` rows (the tokenizer's, and a pause model's pause row); tied models carry
    `lm_head.weight` too, as HF's own state dicts do."""
    check_full_state_dict(full, cfg)
    layer, emb, pos, final, head = _names(cfg)
    v = cfg.embedding_rows
    hf: StateDict = {emb: full["embedding.word_embeddings.weight"][:v].clone()}
    if pos:
        hf[pos] = full["embedding.position_embeddings.weight"].clone()
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"{layer}{i}."
        for h_name, m_name, transpose in _layer_pairs(cfg):
            if src + m_name in full:
                t = full[src + m_name]
                hf[dst + h_name] = (t.t() if transpose else t).contiguous().clone()
        qkv_w = full[src + "self_attention.linear_qkv.weight"]
        qkv_b = full.get(src + "self_attention.linear_qkv.bias")
        if cfg.arch == "gpt2":
            hf[dst + "attn.c_attn.weight"] = torch.cat(_qkv_to_heads(qkv_w, cfg), dim=0).t().contiguous()
            hf[dst + "attn.c_attn.bias"] = torch.cat(_qkv_to_heads(qkv_b, cfg), dim=0)
        elif cfg.arch in LLAMA_LIKE:
            for proj, t in zip("qkv", _qkv_to_heads(qkv_w, cfg)):
                hf[f"{dst}self_attn.{proj}_proj.weight"] = t.contiguous()
            if qkv_b is not None:
                for proj, t in zip("qkv", _qkv_to_heads(qkv_b, cfg)):
                    hf[f"{dst}self_attn.{proj}_proj.bias"] = t.contiguous()
            gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            if cfg.add_bias_linear:
                gate, up = full[src + "mlp.linear_fc1.bias"].chunk(2, dim=0)
                hf[dst + "mlp.gate_proj.bias"], hf[dst + "mlp.up_proj.bias"] = gate.clone(), up.clone()
    hf[final + "weight"] = full["decoder.final_layernorm.weight"].clone()
    if "decoder.final_layernorm.bias" in full:
        hf[final + "bias"] = full["decoder.final_layernorm.bias"].clone()
    out = full["embedding.word_embeddings.weight"] if cfg.tie_embeddings else full["output_layer.weight"]
    hf[head] = out[:v].clone()
    return hf, config_to_hf(cfg)


# HF buffers that old checkpoints carry (causal-mask and rotary caches): not weights.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def hf_to_megatron(hf_state: StateDict, hf_config, **overrides) -> Tuple[ModelConfig, StateDict]:
    """(ModelConfig, full megatron state dict) of an HF causal LM's state dict and config.

    `overrides` replace ModelConfig fields (num_latent_thoughts, make_vocab_size_divisible_by...).
    """
    cfg = config_from_hf(hf_config, **overrides)
    hf = {k: v for k, v in hf_state.items() if not k.endswith(_HF_BUFFERS)}
    layer, emb, pos, final, head = _names(cfg)
    if cfg.arch == "gpt-neox":
        for old in ("embed_out.weight", "lm_head.weight"):  # either name, whichever the file has
            if old in hf and old != head:
                hf[head] = hf.pop(old)
    used = set()

    def get(name):
        if name not in hf:
            raise CheckpointShapeError(f"HF state dict has no tensor {name} (model_type {_hf_type(cfg)})")
        used.add(name)
        return hf[name]

    full: StateDict = {"embedding.word_embeddings.weight": _pad_rows(get(emb), cfg.padded_vocab_size, emb)}
    if pos:
        full["embedding.position_embeddings.weight"] = get(pos).clone()
    for i in range(cfg.num_layers):
        src, dst = f"{layer}{i}.", f"decoder.layers.{i}."
        for h_name, m_name, transpose in _layer_pairs(cfg):
            t = get(src + h_name)
            full[dst + m_name] = (t.t() if transpose else t).contiguous().clone()
        if cfg.arch == "gpt2":
            w = get(src + "attn.c_attn.weight").t()
            full[dst + "self_attention.linear_qkv.weight"] = _qkv_from_heads(*w.chunk(3, dim=0), cfg)
            full[dst + "self_attention.linear_qkv.bias"] = _qkv_from_heads(*get(src + "attn.c_attn.bias").chunk(3), cfg)
        elif cfg.arch in LLAMA_LIKE:
            qkv = [get(f"{src}self_attn.{p}_proj.weight") for p in "qkv"]
            full[dst + "self_attention.linear_qkv.weight"] = _qkv_from_heads(*qkv, cfg)
            if cfg.add_bias_linear or cfg.add_qkv_bias:
                qkv = [get(f"{src}self_attn.{p}_proj.bias") for p in "qkv"]
                full[dst + "self_attention.linear_qkv.bias"] = _qkv_from_heads(*qkv, cfg)
            full[dst + "mlp.linear_fc1.weight"] = torch.cat(
                [get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")])
            if cfg.add_bias_linear:
                full[dst + "mlp.linear_fc1.bias"] = torch.cat(
                    [get(src + "mlp.gate_proj.bias"), get(src + "mlp.up_proj.bias")])
    full["decoder.final_layernorm.weight"] = get(final + "weight").clone()
    if cfg.normalization == "LayerNorm":
        full["decoder.final_layernorm.bias"] = get(final + "bias").clone()
    if not cfg.tie_embeddings:
        full["output_layer.weight"] = _pad_rows(get(head), cfg.padded_vocab_size, head)
    elif head in hf:
        used.add(head)  # tied: HF state dicts may list the head, it is the embedding
    unused = sorted(set(hf) - used)
    if unused:
        raise CheckpointShapeError(f"HF tensor {unused[0]} has no place in model {cfg.name!r} ({len(unused)} unused)")
    check_full_state_dict(full, cfg, source="converted HF weights")
    return cfg, full
