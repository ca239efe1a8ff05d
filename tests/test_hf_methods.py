"""Export of the baselines (interpolated thoughts, pause tokens, extra loops, pondering): the folder loads with
trust_remote_code, names its method in config.json, computes the megatron model's logits (and the
exact sequential reference's), and its KV-cached greedy generation is ours."""

import json

import pytest
import torch

from tiny import VOCAB, ids, latent_model, positions, save, small_config

METHODS = {
    "interpolated": (1, dict(thought_input="interpolated", interpolation_topk=7)),
    "pause": (0, dict(num_pause_tokens=2)),
    "loop": (0, dict(num_extra_loops=2)),
    # The family's feedback and embedding scale (GPT-NeoX: hidden, unscaled), and the residual mix.
    "ponder": (0, dict(num_ponder_steps=2, scale_embeddings=None)),
    "ponder-residual": (0, dict(num_ponder_steps=2, ponder_residual=True)),
}
CASES = [("llama", "interpolated"), ("gpt-neox", "interpolated"), ("gpt2", "interpolated"),
         ("llama", "pause"), ("gpt-neox", "pause"), ("gpt2", "pause"),
         ("llama", "loop"), ("gpt-neox", "loop"), ("gpt2", "loop"),
         ("llama", "ponder"), ("gpt-neox", "ponder"), ("gpt2", "ponder"), ("llama", "ponder-residual")]
P, NEW = 4, 4


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, single_rank):
    return {}


def _export(exports, tmp_path_factory, arch, method):
    import transformers

    from megatron_latent.hf.export import export_to_hf

    if (arch, method) not in exports:
        n, kw = METHODS[method]
        cfg = small_config(arch, n, **{"scale_embeddings": True, **kw})
        root = tmp_path_factory.mktemp(f"{arch}-{method}")
        model = latent_model(cfg)
        save(model, cfg, str(root / "ckpt"))
        export_to_hf(str(root / "ckpt"), str(root / "hf"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True).eval()
        exports[(arch, method)] = (cfg, model, hf, root / "hf")
    return exports[(arch, method)]


@pytest.mark.parametrize("arch,method", CASES)
def test_export_matches_megatron_and_the_reference(exports, tmp_path_factory, arch, method):
    from megatron_latent.inference.reference import sequential_logits

    cfg, model, hf, folder = _export(exports, tmp_path_factory, arch, method)
    conf = json.loads((folder / "config.json").read_text())
    rows = cfg.embedding_rows  # pause models keep the pause row
    assert conf["vocab_size"] == rows == VOCAB + (method == "pause")
    assert conf["num_latent_thoughts"] == cfg.latent.num_latent_thoughts
    assert conf["embedding_scale_factor"] == cfg.latent.embedding_scale_factor
    if method == "pause":
        assert (conf["num_pause_tokens"], conf["pause_token_id"]) == (2, VOCAB)
    elif method == "loop":
        assert conf["num_extra_loops"] == 2
    elif method.startswith("ponder"):
        lat = cfg.latent
        assert (conf["num_ponder_steps"], conf["ponder_feedback"], conf["residual_interpolated_embeds"]) == \
            (2, "hidden" if arch == "gpt-neox" else "interpolated", method == "ponder-residual")
        assert conf["scale_embeds"] == lat.scale_embeddings == (arch != "gpt-neox")
    else:
        assert conf["interpolation"] is True and conf["interpolation_use_topk"] and conf["interpolation_topk"] == 7
    x = ids()
    with torch.no_grad():
        ref = model(x, positions(x), None)[..., :rows]  # eval forward (interpolated: J=3)
        got = hf(x).logits
        exact = sequential_logits(model, x, positions(x))[..., :rows]
        ex = hf(x, latent_prefill="exact").logits
    assert got.shape == ref.shape and _err(got, ref) < 1e-5
    assert _err(ex, exact) < 1e-5
    # Round trip: the exported folder converts back to the same ModelConfig's method and vocabulary.
    from megatron_latent.hf.convert import read_hf_folder
    from megatron_latent.hf.mapping import config_from_hf

    back = config_from_hf(read_hf_folder(str(folder))[1])
    assert back.latent == cfg.latent and back.vocab_size == cfg.vocab_size


@pytest.mark.parametrize("arch,method", CASES)
def test_cached_greedy_generation_is_ours(exports, tmp_path_factory, arch, method):
    from megatron_latent.inference import SamplingParams, generate

    cfg, model, hf, _ = _export(exports, tmp_path_factory, arch, method)
    prompt = torch.randint(0, VOCAB, (2, P), generator=torch.Generator().manual_seed(5))
    ours = generate(model, prompt, NEW, sampling=SamplingParams(vocab_size=cfg.vocab_size), return_logits=True)
    outs = {}
    for cache in (True, False):
        with torch.no_grad():
            outs[cache] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                      do_sample=False, pad_token_id=0, use_cache=cache, latent_prefill="exact",
                                      return_dict_in_generate=True, output_logits=True)
    for out in outs.values():
        assert out.sequences[:, P:].tolist() == ours.ids
        logits = torch.stack(out.logits, 1)
        assert _err(logits, ours.logits[..., :logits.shape[-1]]) < 1e-4
    # K+1 (pause) or (K+1) x layers (loop, ponder) cache entries per fed token.
    cache = outs[True].past_key_values if hasattr(outs[True], "past_key_values") else outs[True].cache
    assert cache.get_seq_length() == cfg.latent.num_slots * (P + NEW - 1)
