"""Presets: parameter counts (against the published Pythia sizes, against the HF reference classes
built on the meta device, and against our built models), config validation errors."""

import pytest
import torch

# Published Pythia sizes (total parameters incl. embeddings, EleutherAI/pythia README).
PYTHIA = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
}
# The released Llama-3.x / Qwen2.5 / Qwen3 checkpoints' parameter counts (their safetensors).
RELEASED = {
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
}
LLAMA_SHAPES = {  # the paper's d / layers / heads / ffn
    "llama-125m": (768, 12, 12, 2064), "llama-410m": (1024, 24, 16, 2752), "llama-834m": (1536, 24, 24, 4128),
    "llama-1.4b": (2048, 24, 32, 5504), "llama-2.8b": (2048, 48, 32, 5504),
}


def test_pythia_counts_match_published():
    from megatron_latent.config import get_preset

    for name, n in PYTHIA.items():
        assert get_preset(name).num_parameters() == n, name


def test_modern_presets_match_released_models():
    from megatron_latent.config import get_preset

    for name, n in RELEASED.items():
        c = get_preset(name)
        assert c.num_parameters() == n and c.padded_vocab_size == c.vocab_size and not c.family_departures(), name
    assert get_preset("llama-3.2-1b").rope_scaling and get_preset("qwen2.5-0.5b").add_qkv_bias
    assert get_preset("qwen3-0.6b").qk_layernorm and get_preset("qwen3-0.6b").head_dim == 128


def test_llama_presets_are_the_papers():
    from megatron_latent.config import get_preset

    for name, (d, layers, heads, ffn) in LLAMA_SHAPES.items():
        c = get_preset(name)
        assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size) == (d, layers, heads, ffn)
        assert c.padded_vocab_size == 50304 and not c.tie_embeddings and c.arch == "llama"


def test_counts_equal_hf_reference_models():
    """Every full-size preset, as the stock HF class (meta device: no memory), has our count
    (vocabulary padded to the same size)."""
    import transformers

    from megatron_latent.config import PRESETS
    from megatron_latent.hf.mapping import config_to_hf

    for name, c in PRESETS.items():
        hc = config_to_hf(c.replace(vocab_size=c.padded_vocab_size))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hc)
        # HF lists a tied head once in parameters(); positions are learned for gpt2 only.
        assert sum(p.numel() for p in model.parameters()) == c.num_parameters(), name


def test_built_tiny_models_have_the_reported_count(single_rank):
    from megatron_latent.config import PRESETS
    from megatron_latent.models.gpt import build_gpt_model

    for name in ("tiny-gpt2", "tiny-pythia", "tiny-llama"):
        model = build_gpt_model(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_parameters(), name


def test_parallel_residual_layer_is_used_for_pythia(single_rank):
    from megatron_latent.config import get_preset
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.parallel_residual import ParallelResidualTransformerLayer

    layer = build_gpt_model(get_preset("tiny-pythia")).decoder.layers[0]
    assert isinstance(layer, ParallelResidualTransformerLayer) and layer.partial_sums
    assert not isinstance(build_gpt_model(get_preset("tiny-llama")).decoder.layers[0], ParallelResidualTransformerLayer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=5), "hidden_size 64 is not divisible by num_attention_heads 5"),
        (dict(num_query_groups=3), "num_query_groups 3 must divide num_attention_heads 4"),
        (dict(rotary_percent=0.3), "rotary_percent 0.3"),
        (dict(num_latent_thoughts=-1), "num_latent_thoughts must be an integer >= 0"),
        (dict(num_latent_thoughts=1, jacobi_iters=(3, 2)), r"jacobi_iters \[3, 2\]"),
        (dict(activation="relu"), "activation 'relu'"),
    ],
)
def test_bad_config_names_field(overrides, message):
    from megatron_latent.config import ConfigError, get_preset

    with pytest.raises(ConfigError, match=message):
        get_preset("tiny-llama", **overrides)


def test_unknown_preset_lists_presets():
    from megatron_latent.config import ConfigError, get_preset

    with pytest.raises(ConfigError, match="model_preset 'pythia-7b' is unknown; presets: pythia-70m"):
        get_preset("pythia-7b")


def test_config_round_trips_and_latent_settings():
    from megatron_latent.config import ModelConfig, get_preset

    c = get_preset("tiny-pythia", num_latent_thoughts=1, scale_embeddings=True)
    assert ModelConfig.from_dict(c.to_dict()) == c
    s = c.latent
    assert (s.num_latent_thoughts, s.jacobi_iters, s.jacobi_iters_eval, s.scale_embeddings) == (1, (2, 4), 3, True)
    assert get_preset("tiny-pythia").latent.num_latent_thoughts == 0


@pytest.mark.parametrize(
    "recompute",
    [dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
     dict(recompute_granularity="selective", recompute_modules=["mlp", "layernorm"])],
)
def test_parallel_residual_recompute_equals_plain(single_rank, recompute):
    from megatron_latent.config import get_preset
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.transformer_config import to_transformer_config

    cfg = get_preset("tiny-pythia")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(16).expand(2, 16)
    results = []
    for overrides in ({}, recompute):
        torch.manual_seed(5)
        model = build_gpt_model(cfg, config=to_transformer_config(cfg, **overrides)).train()
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert l1 == l0
    assert all(torch.allclose(g1[n], g0[n], rtol=1e-6, atol=1e-9) for n in g0)


def test_selective_mlp_recompute_with_biases_is_refused():
    from megatron_latent.config import ConfigError, get_preset
    from megatron_latent.models.transformer_config import to_transformer_config

    with pytest.raises(ConfigError, match="recompute_modules mlp"):
        to_transformer_config(get_preset("tiny-gpt2"), recompute_granularity="selective", recompute_modules=["mlp"])
