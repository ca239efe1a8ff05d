"""Megatron-LM's architecture flags: without a preset they build Megatron-LM's defaults; with one,
they replace the preset's fields; each reaches the built model with Megatron-LM's meaning; bad
combinations stop with one line naming the flags."""

import pytest
import torch

from megatron_latent.models.init import init_methods
from megatron_latent.training.arguments import model_config_from_args, parse_args

SIZES = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--vocab-size", "100"]


def _cfg(*flags):
    return model_config_from_args(parse_args(list(flags)))


def test_no_preset_builds_megatron_lm_defaults():
    cfg = _cfg(*SIZES)
    assert (cfg.arch, cfg.normalization, cfg.activation, cfg.position_embedding_type) == (
        "gpt2", "LayerNorm", "gelu", "learned_absolute")
    assert cfg.add_bias_linear and cfg.add_qkv_bias and cfg.tie_embeddings and not cfg.parallel_residual
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.ffn_hidden_size, cfg.query_groups) == (0.1, 0.1, 128, 4)
    assert (cfg.init_style, cfg.init_method_std, cfg.norm_epsilon, cfg.seq_length) == ("megatron", 0.02, 1e-5, 16)
    assert cfg.latent.method == "vanilla" and not cfg.latent.scale_embeddings
    # A GPT-2 shaped model with exact GeLU: the Hugging Face GPT-2 class holds it.
    assert cfg.family_departures() == []
    # Megatron-LM's SwiGLU width: 2/3 of 4 H, rounded down to a multiple of 64.
    assert _cfg(*SIZES[:4], "96", *SIZES[5:], "--swiglu").ffn_hidden_size == 256


def test_a_llama_3_flag_set_builds_its_model():
    cfg = _cfg(*SIZES, "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
               "--rotary-base", "500000", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
               "--group-query-attention", "--num-query-groups", "2", "--attention-dropout", "0",
               "--hidden-dropout", "0", "--norm-epsilon", "1e-6", "--ffn-hidden-size", "112")
    assert (cfg.normalization, cfg.activation, cfg.position_embedding_type, cfg.rotary_base) == (
        "RMSNorm", "swiglu", "rope", 500000.0)
    assert not (cfg.add_bias_linear or cfg.add_qkv_bias or cfg.tie_embeddings)
    assert (cfg.query_groups, cfg.hidden_dropout, cfg.attention_dropout, cfg.norm_epsilon) == (2, 0.0, 0.0, 1e-6)
    # A Megatron-LM flag set with the llama family's fields is exportable as that family? It is GPT-2
    # shaped (no preset), so the flags that leave GPT-2 are named.
    assert "normalization RMSNorm" in ", ".join(cfg.family_departures())
    # Llama-3.1's rope scaling, megatron-core's (tests/test_hf_modern_families.py checks it against HF).
    scaled = _cfg("--mock-data", "--model-preset", "tiny-llama", "--use-rope-scaling", "--rope-scaling-factor", "32")
    assert (scaled.rope_scaling, scaled.rope_scaling_factor) == (True, 32.0) and not scaled.family_departures()


def test_a_preset_with_flags_is_the_preset_with_those_fields_replaced():
    base = _cfg("--mock-data", "--model-preset", "tiny-llama")
    cfg = _cfg("--mock-data", "--model-preset", "tiny-llama", "--normalization", "LayerNorm", "--add-qkv-bias",
               "--qk-layernorm", "--hidden-dropout", "0.2", "--init-method-std", "0.01")
    changed = {"normalization": "LayerNorm", "add_qkv_bias": True, "qk_layernorm": True, "hidden_dropout": 0.2,
               "init_style": "megatron", "init_method_std": 0.01}
    assert cfg == base.replace(**changed)
    assert {f for f in base.to_dict() if base.to_dict()[f] != cfg.to_dict()[f]} == set(changed)
    assert base.init_style == "paper" and base.hidden_dropout == 0.0  # the preset's, unchanged without flags
    # Leaving the family's Hugging Face class is allowed for training, and named for export.
    from megatron_latent.hf.mapping import UnsupportedArchitectureError, config_to_hf

    with pytest.raises(UnsupportedArchitectureError, match="normalization LayerNorm.*qk_layernorm True"):
        config_to_hf(cfg)
    assert _cfg("--mock-data", "--model-preset", "tiny-gpt2", "--disable-bias-linear").add_qkv_bias is False


def test_megatron_init_scales_the_output_projections(single_rank):
    from megatron_latent.models.gpt import build_gpt_model

    cfg = _cfg("--mock-data", "--model-preset", "tiny-llama", "--init-method-std", "0.05")
    torch.manual_seed(0)
    m = build_gpt_model(cfg)
    layers = m.decoder.layers
    qkv = torch.cat([x.self_attention.linear_qkv.weight.flatten() for x in layers])
    out = torch.cat([w.flatten() for x in layers for w in (x.self_attention.linear_proj.weight,
                                                            x.mlp.linear_fc2.weight)])
    assert qkv.std().item() == pytest.approx(0.05, rel=5 / (2 * qkv.numel()) ** 0.5)
    assert out.std().item() == pytest.approx(0.05 / (2 * cfg.num_layers) ** 0.5, rel=5 / (2 * out.numel()) ** 0.5)
    assert m.embedding.word_embeddings.weight.std().item() == pytest.approx(0.05, rel=0.02)
    # The stock HF init of the LLaMA family does not scale them.
    hf = _cfg("--mock-data", "--model-preset", "tiny-llama", "--init-style", "hf", "--init-method-std", "0.05")
    assert init_methods(hf)["output_layer_init_method"].std == 0.05


def test_each_flag_reaches_the_built_model(single_rank):
    from megatron_latent.models.gpt import build_gpt_model

    cfg = _cfg("--mock-data", "--model-preset", "tiny-llama", "--kv-channels", "8", "--qk-layernorm",
               "--squared-relu", "--position-embedding-type", "none", "--add-qkv-bias")
    m = build_gpt_model(cfg)
    attn = m.decoder.layers[0].self_attention
    assert attn.linear_qkv.weight.shape == ((4 + 2 * 2) * 8, 64) and attn.linear_qkv.bias is not None
    assert attn.linear_proj.weight.shape == (64, 4 * 8) and attn.linear_proj.bias is None
    assert attn.q_layernorm.weight.shape == (8,) and isinstance(attn.k_layernorm, torch.nn.RMSNorm)
    assert m.decoder.layers[0].mlp.linear_fc1.weight.shape == (176, 64)  # not gated
    assert not hasattr(m, "rotary_pos_emb") and not m.embedding.add_position_embedding
    assert sum(p.numel() for p in m.parameters()) == cfg.num_parameters()
    ids = torch.randint(0, 256, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    assert torch.isfinite(m(ids, pos, None)).all()


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_apply_layernorm_1p_scales_by_one_plus_the_weight(single_rank, norm):
    # The 1p model with norm weights w computes what the plain model with weights 1 + w computes.
    from megatron_latent.models.gpt import build_gpt_model

    flags = ["--mock-data", "--model-preset", "tiny-llama", "--normalization", norm]
    one_p = build_gpt_model(_cfg(*flags, "--apply-layernorm-1p"))
    plain = build_gpt_model(_cfg(*flags))
    norms = [k for k, p in one_p.named_parameters() if "layernorm.weight" in k]
    assert norms and all(torch.equal(p, torch.zeros_like(p)) for k, p in one_p.named_parameters() if k in norms)
    with torch.no_grad():
        for k, p in one_p.named_parameters():
            p.normal_(0, 0.1) if k in norms else None
        state = {k: v + 1 if k in norms else v for k, v in one_p.state_dict().items()}
    plain.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(one_p(ids, pos, None), plain(ids, pos, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, needle", [
    (["--mock-data", "--num-layers", "2"], "give --hidden-size, --num-attention-heads (or a --model-preset)"),
    (SIZES[:-2], "--mock-data without --tokenizer-type needs --vocab-size"),
    (SIZES + ["--swiglu", "--squared-relu"], "give one of --swiglu and --squared-relu"),
    (SIZES + ["--num-query-groups", "2"], "--num-query-groups takes effect with --group-query-attention"),
    (SIZES + ["--init-style", "paper", "--init-method-std", "0.02"], "--init-method-std applies to --init-style"),
    (SIZES + ["--use-rotary-position-embeddings", "--position-embedding-type", "learned_absolute"],
     "--use-rotary-position-embeddings is --position-embedding-type rope"),
    (SIZES + ["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
    (SIZES + ["--use-rope-scaling"], "--use-rope-scaling needs --position-embedding-type rope"),
    (SIZES + ["--lr-warmup-iters", "5", "--lr-decay-iters", "5", "--train-iters", "8"],
     "the lr warmup (5 iterations) must be shorter than the decay (5 iterations"),
    (SIZES + ["--train-samples", "64", "--lr-decay-iters", "4"],
     "--lr-decay-iters with --train-samples: give --lr-decay-samples"),
    (SIZES + ["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (SIZES + ["--recompute-activations", "--recompute-modules", "layernorm"],
     "--recompute-modules layernorm: megatron-core 0.16.1 recomputes norms only through Transformer Engine"),
    (SIZES + ["--recompute-modules", "mlp"], "--recompute-modules applies to --recompute-granularity selective"),
    (SIZES + ["--weight-decay-incr-style", "linear"], "--weight-decay-incr-style linear needs --start-weight-decay"),
])
def test_bad_architecture_flags_are_one_clear_error(flags, needle, capsys):
    from megatron_latent import pretrain

    try:
        code = pretrain.main(flags + ["--num-workers", "0", "--eval-iters", "0"])
    except SystemExit as e:  # found by the parser: argparse's usage, then the one error line
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "error: " in err[-1] and needle in err[-1], err
    assert len(err) == 1 or err[0].startswith("usage: ")


def test_optimizer_sgd_is_megatron_cores_sgd_with_its_momentum(single_rank):
    # One step of megatron-core's SGD: w <- w - lr (g + wd w) (momentum buffer starts as the gradient).
    from megatron_latent import pretrain
    from megatron_latent.config import ParallelLayout
    from megatron_latent.training import engine

    args = parse_args(["--mock-data", "--model-preset", "tiny-llama", "--optimizer", "sgd", "--sgd-momentum", "0.8",
                       "--weight-decay", "0", "--lr", "0.5", "--lr-warmup-iters", "0", "--clip-grad", "0"])
    cfg = model_config_from_args(args)
    model = engine.wrap_ddp(pretrain.build_model(cfg, ParallelLayout(1, 1), args))
    opt, sched = pretrain.build_optimizer_and_scheduler(model, args)
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    assert all(isinstance(o, torch.optim.SGD) and o.param_groups[0]["momentum"] == 0.8 for o in inner)
    params = [p for p in model[0].parameters()]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.main_grad.fill_(0.01)
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.5 * 0.01, rtol=0, atol=1e-7)


def test_data_parallel_random_init_changes_only_the_dropout_streams(tmp_path):
    # DP=2: the same initial weights either way (the first loss of a dropout-free model is the same),
    # but rank 1 draws other dropout masks with the flag (the first loss of a dropout model moves).
    from multirank import run_on_ranks
    from test_pretrain import _losses, _runs, _tb

    base = SIZES + ["--num-workers", "0", "--eval-iters", "0", "--train-iters", "1", "--micro-batch-size", "2",
                    "--global-batch-size", "4"]
    quiet = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    flag = ["--data-parallel-random-init"]
    argvs = {"drop": [], "drop-flag": flag, "quiet": quiet, "quiet-flag": quiet + flag}
    runs = run_on_ranks(_runs, 2, [base + extra + _tb(tmp_path, name) for name, extra in argvs.items()])
    assert all(r[0] == 0 for per in runs for r in per), runs[0]
    loss = {name: _losses(tmp_path, name)[1] for name in argvs}
    assert loss["quiet"] == loss["quiet-flag"]
    assert abs(loss["drop"] - loss["drop-flag"]) > 1e-6
