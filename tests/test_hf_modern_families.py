"""Llama-3.x (llama3 rope scaling, tied embeddings), Qwen2.5 (q/k/v biases, tied) and Qwen3 (per-head
q/k RMSNorm, heads wider than hidden / heads): import from tiny random stock transformers models
with their logits (one rank and TP=2), exact round trips, export (N=0: the stock class, its logits and greedy
generation; N=1: the remote code, megatron's logits and exact rollout), and a stock folder through
tools/convert_from_hf.py followed by latent continued pretraining."""

import importlib.util
import os

import pytest
import torch

from hf_tiny import FAMILY, VOCAB, hf_logits, hf_model, rel_err, tokens
from multirank import run_on_ranks

MODERN = ["llama3", "qwen2", "qwen3"]
STOCK = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 5


def _megatron_logits(cfg, full, ids):
    from tiny import latent_model

    # The latent model (N=0 here is a plain GPT) indexes rotary by position id, as HF does.
    with torch.no_grad():
        return latent_model(cfg, full)(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def _greedy(hf, ids, **kw):
    hf.generation_config.eos_token_id = None  # NEW tokens on both sides (the stock configs name an eos)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("arch", MODERN)
def test_logits_match_hf(arch):
    from megatron_latent.hf.mapping import hf_to_megatron

    hf = hf_model(arch)
    ids = tokens()
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    assert cfg.arch == FAMILY[arch] and cfg.query_groups == 2 and cfg.padded_vocab_size == 256
    assert (cfg.rope_scaling, cfg.add_qkv_bias, cfg.add_bias_linear, cfg.qk_layernorm, cfg.head_dim,
            cfg.tie_embeddings) == {"llama3": (True, False, False, False, 16, True),
                                    "qwen2": (False, True, False, False, 16, True),
                                    "qwen3": (False, False, False, True, 32, False)}[arch]
    assert not cfg.family_departures()
    ref = hf_logits(hf, ids)
    got = _megatron_logits(cfg, full, ids)[..., :VOCAB]
    assert rel_err(got, ref) < 1e-5
    if arch == "llama3":
        # The scaling moves these logits: without it the same weights are visibly off.
        plain = _megatron_logits(cfg.replace(rope_scaling=False), full, ids)[..., :VOCAB]
        assert rel_err(plain, ref) > 1e-4


@pytest.mark.parametrize("arch", MODERN)
def test_round_trip_is_exact(arch):
    from megatron_latent.hf.layout import merge_tp_pp, split_tp_pp
    from megatron_latent.hf.mapping import hf_to_megatron, megatron_to_hf

    hf = hf_model(arch)
    src = hf.state_dict()
    cfg, full = hf_to_megatron(src, hf.config)
    again = merge_tp_pp(split_tp_pp(full, cfg, 2, 2), cfg)
    assert again.keys() == full.keys() and all(torch.equal(again[k], full[k]) for k in full)
    back, hf_cfg = megatron_to_hf(full, cfg)
    assert back.keys() == src.keys()
    assert all(torch.equal(back[k], src[k]) for k in src)
    assert type(hf_cfg).__name__ == type(hf.config).__name__
    cfg2, _ = hf_to_megatron(back, hf_cfg)
    assert cfg2.replace(name=cfg.name) == cfg


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("arch", MODERN)
def test_export_matches(tmp_path, arch, n):
    import transformers

    from megatron_latent.hf.export import export_to_hf
    from megatron_latent.hf.mapping import hf_to_megatron
    from megatron_latent.inference.reference import sequential_logits
    from tiny import latent_model, save

    src = hf_model(arch)
    cfg, full = hf_to_megatron(src.state_dict(), src.config, num_latent_thoughts=n)
    model = latent_model(cfg, full)
    save(model, cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=n > 0).eval()
    ids = tokens(seq=8)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ref = model(ids, pos, None)[..., :VOCAB]
        got = hf(ids).logits
    assert rel_err(got, ref) < 1e-5
    if n == 0:
        # The stock class, without remote code: the source model's logits and greedy generation.
        assert type(hf).__name__ == STOCK[arch] and not (tmp_path / "hf" / "modeling_latent.py").exists()
        assert rel_err(got, hf_logits(src, ids)) < 1e-5
        ours, theirs = _greedy(hf, ids), _greedy(src, ids)
        assert torch.equal(ours.sequences, theirs.sequences)
        assert rel_err(torch.stack(ours.logits, 1), torch.stack(theirs.logits, 1)) < 1e-5
        return
    assert type(hf).__name__ == "Latent" + STOCK[arch]
    # Greedy generation with the cache: every step is megatron's exact rollout over the sequence.
    out = _greedy(hf, ids, latent_prefill="exact")
    seq = out.sequences
    exact = sequential_logits(model, seq, torch.arange(seq.shape[1]).expand_as(seq))[..., :VOCAB]
    assert rel_err(torch.stack(out.logits, 1), exact[:, ids.shape[1] - 1:-1]) < 1e-5
    assert torch.equal(seq[:, ids.shape[1]:], exact[:, ids.shape[1] - 1:-1].argmax(-1))
    # The thoughts matter (the checks above can fail): N=0 over the same weights differs.
    plain = latent_model(cfg.replace(num_latent_thoughts=0), full)
    with torch.no_grad():
        assert rel_err(plain(ids, pos, None)[..., :VOCAB], ref) > 1e-2


def _tp2_logits():
    """Each family's converted weights at TP=2 (q/k norms replicated, q/k/v biases split by group)."""
    from megatron_latent.hf.mapping import hf_to_megatron
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(2, 1)
    out = {}
    for arch in MODERN:
        hf = hf_model(arch)
        cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
        out[arch] = rel_err(_megatron_logits(cfg, full, tokens())[..., :VOCAB], hf_logits(hf, tokens()))
    return out


@pytest.mark.slow  # TP=2 of these families is also covered by test_latent_presets (loss and gradients)
def test_logits_match_hf_at_tp2():
    for errs in run_on_ranks(_tp2_logits, 2, timeout=300):
        assert all(e < 1e-5 for e in errs.values()), errs


def _convert_all(folders):
    spec = importlib.util.spec_from_file_location("convert_from_hf", os.path.join(ROOT, "tools", "convert_from_hf.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return [tool.main(["--hf-dir", hf_dir, "--save", ckpt]) for hf_dir, ckpt in folders]


def test_stock_folder_converts_and_continues_pretraining(tmp_path):
    """save_pretrained folder -> tools/convert_from_hf.py -> two steps of latent (N=1) training."""
    from test_pretrain import LATENT, _losses, _runs, _tb

    folders = []
    for arch in MODERN:
        hf_dir, ckpt = str(tmp_path / f"hf-{arch}"), str(tmp_path / f"ckpt-{arch}")
        hf_model(arch).save_pretrained(hf_dir)
        folders.append((hf_dir, ckpt))
    (codes,) = run_on_ranks(_convert_all, 1, folders, timeout=300)
    assert codes == [0, 0, 0]
    argvs = [["--mock-data", "--load", ckpt, "--use-checkpoint-args", "--finetune", "--num-workers", "0",
              "--seq-length", "16", "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2"]
             + LATENT + _tb(tmp_path, f"tb-{arch}") for arch, (_, ckpt) in zip(MODERN, folders)]
    (results,) = run_on_ranks(_runs, 1, argvs, timeout=400)
    for arch, (code, out, err) in zip(MODERN, results):
        assert code == 0, (arch, err)
        assert "loaded weights of iteration 0" in out, arch
        losses = _losses(tmp_path, f"tb-{arch}")
        assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), arch


@pytest.mark.parametrize("rope, needle", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
      "original_max_position_embeddings": 8192}, "llama3 rope scaling high_freq_factor 2.0"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 4096}, "original_max_position_embeddings 4096"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "rope_type 'yarn'"),
])
def test_rope_scaling_megatron_cannot_compute_is_refused(rope, needle):
    import transformers as tf

    from megatron_latent.hf.mapping import UnsupportedArchitectureError, config_from_hf

    c = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                       vocab_size=64, max_position_embeddings=32, rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(UnsupportedArchitectureError, match=needle) as e:
        config_from_hf(c)
    assert "\n" not in str(e.value)
    qwen = tf.Qwen2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                          vocab_size=64, rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(UnsupportedArchitectureError, match="qwen2 with rope_type"):
        config_from_hf(qwen)
