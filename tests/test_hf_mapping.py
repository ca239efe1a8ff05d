"""HF <-> megatron weight mapping on one rank: logits parity with the stock transformers classes,
exact round trips, shard merge/split, and the errors for bad input."""

import pytest
import torch

from hf_tiny import VOCAB, hf_logits, hf_model, rel_err, tokens

ARCHS = ["gpt2", "gpt-neox", "llama"]


def _megatron_logits(cfg, full, ids):
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.models.gpt import build_gpt_model

    model = build_gpt_model(cfg, parallel_output=False).eval()
    load_full_into_model(model, full, cfg)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(single_rank, arch):
    from megatron_latent.hf.mapping import hf_to_megatron

    hf = hf_model(arch)
    ids = tokens()
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    assert cfg.arch == arch and cfg.vocab_size == VOCAB and cfg.padded_vocab_size == 256
    if arch == "llama":
        assert cfg.query_groups == 2 and cfg.num_attention_heads == 4  # grouped-query attention
    got = _megatron_logits(cfg, full, ids)
    assert got.shape == (2, ids.shape[1], 256)
    ref = hf_logits(hf, ids)
    assert rel_err(got[..., :VOCAB], ref) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_exact(arch):
    from megatron_latent.hf.layout import merge_tp_pp, split_tp_pp
    from megatron_latent.hf.mapping import hf_to_megatron, megatron_to_hf

    hf = hf_model(arch)
    src = hf.state_dict()
    cfg, full = hf_to_megatron(src, hf.config)
    # Through every shard layout and back: the full state dict is layout free.
    for tp, pp in ((2, 1), (1, 2), (2, 2), (4, 1)):
        if cfg.query_groups % tp:
            continue
        again = merge_tp_pp(split_tp_pp(full, cfg, tp, pp), cfg)
        assert again.keys() == full.keys()
        assert all(torch.equal(again[k], full[k]) for k in full), (tp, pp)
    back, hf_cfg = megatron_to_hf(full, cfg)
    assert back.keys() == src.keys()
    for k in src:
        assert torch.equal(back[k], src[k]), k
    cfg2, full2 = hf_to_megatron(back, hf_cfg)
    assert cfg2.replace(name=cfg.name) == cfg
    assert all(torch.equal(full2[k], full[k]) for k in full)


def test_swiglu_shards_hold_gate_and_up_slices():
    from megatron_latent.hf.layout import split_tp_pp
    from megatron_latent.hf.mapping import hf_to_megatron

    hf = hf_model("llama")
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    shards = split_tp_pp(full, cfg, 2, 1)
    gate = hf.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    up = hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    f = gate.shape[0] // 2
    for t in range(2):
        fc1 = shards[0][t]["decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(fc1[:f], gate[t * f:(t + 1) * f]) and torch.equal(fc1[f:], up[t * f:(t + 1) * f])


def test_qkv_groups_follow_megatron_layout():
    from megatron_latent.hf.mapping import hf_to_megatron

    hf = hf_model("llama")
    sd = hf.state_dict()
    cfg, full = hf_to_megatron(sd, hf.config)
    d = cfg.head_dim  # 16; 2 query heads per group
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"]
    q, k, v = (sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    group1 = qkv[4 * d:8 * d]
    assert torch.equal(group1[:2 * d], q[2 * d:4 * d])
    assert torch.equal(group1[2 * d:3 * d], k[d:2 * d]) and torch.equal(group1[3 * d:], v[d:2 * d])


def test_padded_hf_vocab_imports_and_exports_unchanged():
    from megatron_latent.hf.mapping import hf_to_megatron, megatron_to_hf

    hf = hf_model("gpt-neox")
    sd = hf.state_dict()
    cfg, full = hf_to_megatron(sd, hf.config, make_vocab_size_divisible_by=50)  # 250 rows = padded
    assert cfg.padded_vocab_size == VOCAB
    back, _ = megatron_to_hf(full, cfg)
    assert torch.equal(back["lm_head.weight"], sd["lm_head.weight"])
    # Hub checkpoints (Pythia) name the GPT-NeoX head embed_out.
    old = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in sd.items()}
    assert torch.equal(hf_to_megatron(old, hf.config)[1]["output_layer.weight"][:VOCAB], sd["lm_head.weight"])
    cfg, full = hf_to_megatron(sd, hf.config)  # 250 -> 256: zero rows appended
    assert torch.equal(full["output_layer.weight"][VOCAB:], torch.zeros(6, 64))


def test_unsupported_architecture_is_named():
    import transformers as tf

    from megatron_latent.hf.mapping import UnsupportedArchitectureError, config_from_hf

    c = tf.MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=64)
    c.architectures = ["MistralForCausalLM"]
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM.*supported: GPT2LMHeadModel"):
        config_from_hf(c)


def test_shape_mismatch_names_tensor_and_shapes():
    from megatron_latent.config import get_preset
    from megatron_latent.hf.layout import CheckpointShapeError, check_full_state_dict, split_tp_pp
    from megatron_latent.hf.mapping import hf_to_megatron

    hf = hf_model("llama")
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    wrong = get_preset("tiny-llama", vocab_size=VOCAB)  # ffn 176 vs 96, 4 layers vs 2
    with pytest.raises(CheckpointShapeError, match="decoder.layers.2.input_layernorm.weight is missing"):
        check_full_state_dict(full, wrong)
    with pytest.raises(CheckpointShapeError,
                       match=r"mlp.linear_fc1.weight has shape \(192, 64\), model .* expects \(352, 64\)"):
        split_tp_pp(full, wrong.replace(num_layers=2), 1, 1)


def test_tensor_parallel_larger_than_groups_names_field():
    from megatron_latent.config import ConfigError
    from megatron_latent.hf.layout import split_tp_pp
    from megatron_latent.hf.mapping import hf_to_megatron
    from megatron_latent.models.transformer_config import to_transformer_config

    hf = hf_model("llama")
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size 4 does not divide the num_query_groups 2"):
        split_tp_pp(full, cfg, 4, 1)
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size 8 does not divide the num_attention_heads 4"):
        to_transformer_config(cfg, tensor_model_parallel_size=8)
