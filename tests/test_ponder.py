"""Pondering (PonderLM) in the one pass loop, single rank: equal to a hand-written loop of full
forwards (logits and gradients) for both feedbacks of the authors' code, with and without the
residual option; its settings, defaults and refusals."""

import math

import pytest
import torch

import pipeline_cases as pc
from megatron_latent.config import ConfigError, LatentSettings, get_preset
from megatron_latent.models.gpt import build_gpt_model
from megatron_latent.models.init import init_methods
from megatron_latent.models.latent import LatentGPTModel
from parallel_utils import batch

pytestmark = pytest.mark.usefixtures("single_rank")
L = pc.L


def _model(arch, **latent):
    # Large weights (HF init, std 0.2): the output softmax is far from uniform, so every step moves the logits.
    cfg = pc.tiny_cfg(arch, 0, layers=2, init_method_std=0.2).replace(**latent)
    torch.manual_seed(0)
    return cfg, build_gpt_model(cfg, parallel_output=False, model_cls=LatentGPTModel).eval()


def _reference_logits(m, cfg, tokens, positions):
    """The authors' loop written out on the model's weights: e0 = E[x] * scale (+ the position
    embedding); K times a full forward h, then x = e0 (or x) + softmax(h W^T) @ (E * scale), or
    x = x + h; a last forward gives the logits."""
    lat, v = cfg.latent, cfg.vocab_size
    emb = m.embedding.word_embeddings.weight
    head = emb if cfg.tie_embeddings else m.output_layer.weight
    scale = math.sqrt(cfg.hidden_size) if lat.scale_embeddings else 1.0
    e0 = emb[tokens] * scale
    if cfg.position_embedding_type == "learned_absolute":
        e0 = e0 + m.embedding.position_embeddings(positions)
    rotary = m.rotary_pos_emb(L) if cfg.position_embedding_type == "rope" else None
    x = e0.transpose(0, 1)
    for _ in range(lat.num_ponder_steps):
        h = m.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
        if lat.ponder_feedback == "hidden":
            x = x + h
        else:
            p = torch.softmax(h @ head[:v].t(), dim=-1)
            x = (x if lat.ponder_residual else e0.transpose(0, 1)) + p @ (emb[:v] * scale)
    h = m.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
    return (h @ head.t()).transpose(0, 1)


CASES = [("llama", dict(num_ponder_steps=1)), ("llama", dict(num_ponder_steps=3)),
         ("llama", dict(num_ponder_steps=3, ponder_residual=True)), ("gpt-neox", dict(num_ponder_steps=1)),
         ("gpt-neox", dict(num_ponder_steps=3)), ("gpt2", dict(num_ponder_steps=2)),
         ("gpt-neox", dict(num_ponder_steps=2, ponder_feedback="interpolated", ponder_residual=True))]


@pytest.mark.parametrize("arch,latent", CASES, ids=[f"{a}-{'-'.join(map(str, k.values()))}" for a, k in CASES])
def test_forward_and_gradients_equal_the_loop_of_full_forwards(arch, latent):
    torch.manual_seed(0)
    cfg, m = _model(arch, **latent)
    d = batch(3, 2, L)
    got = m(d["tokens"], d["position_ids"], None)
    ref = _reference_logits(m, cfg, d["tokens"], d["position_ids"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # The steps matter: the same weights' single forward (same embedding scale) computes other logits.
    plain = build_gpt_model(cfg.replace(num_ponder_steps=0, scale_embeddings=cfg.latent.scale_embeddings),
                            parallel_output=False, model_cls=LatentGPTModel).eval()
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (plain(d["tokens"], d["position_ids"], None) - got).abs().max() > 0.1 * got.abs().max()
    # Gradients of the loss through every step.
    loss = torch.nn.functional.cross_entropy(got[..., :cfg.vocab_size].flatten(0, 1), d["labels"].flatten())
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref_loss = torch.nn.functional.cross_entropy(ref[..., :cfg.vocab_size].flatten(0, 1), d["labels"].flatten())
    ref_grads = torch.autograd.grad(ref_loss, list(m.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_the_authors_defaults_per_family():
    llama = get_preset("tiny-llama").replace(num_ponder_steps=3)
    neox = get_preset("tiny-pythia").replace(num_ponder_steps=3)
    # LLaMA (modeling_llama_orin.py): the softmax mix, embeddings x sqrt(H); GPT-NeoX
    # (modeling_gpt_neox_addhidden.py): the hidden state added, embeddings unscaled.
    assert (llama.latent.ponder_feedback, llama.latent.scale_embeddings) == ("interpolated", True)
    assert (neox.latent.ponder_feedback, neox.latent.scale_embeddings) == ("hidden", False)
    assert llama.latent.embedding_scale_factor == 1.0
    assert (llama.latent.label, neox.latent.label) == ("ponder K=3", "ponder K=3 hidden")
    assert llama.replace(ponder_residual=True).latent.label == "ponder K=3 residual"
    assert llama.latent.pass_slots(0) == [1, 1, 1, 1] and llama.latent.method == "ponder"
    assert llama.latent.paper_weight_decay == 0.01 and get_preset("tiny-llama").latent.paper_weight_decay == 0.1
    # The init: LLaMA's output projections by sqrt(2 L) (theirs); GPT-NeoX counts the K+1 forwards.
    base = init_methods(get_preset("tiny-pythia"))["output_layer_init_method"].std
    assert init_methods(neox)["output_layer_init_method"].std == pytest.approx(base / 2)
    assert init_methods(llama)["output_layer_init_method"].std == \
        init_methods(get_preset("tiny-llama"))["output_layer_init_method"].std
    # Switching away from pondering drops its options.
    assert neox.replace(num_ponder_steps=0, num_latent_thoughts=1).latent.ponder_feedback is None


@pytest.mark.parametrize("kw,msg", [
    (dict(num_ponder_steps=2, num_extra_loops=1), "num_extra_loops and num_ponder_steps are exclusive"),
    (dict(num_ponder_steps=2, num_latent_thoughts=1), "num_latent_thoughts and num_ponder_steps are exclusive"),
    (dict(ponder_residual=True), "apply to pondering"),
    (dict(num_ponder_steps=1, ponder_feedback="hidden", ponder_residual=True), "ponder_residual applies to"),
    (dict(num_ponder_steps=1, ponder_feedback="logits"), "ponder_feedback 'logits'"),
])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LatentSettings(**kw)
