"""Checkpoints in the authors' format (LUMIA-Group/PonderLM-2: a stock GPT-NeoX / LLaMA folder whose
config.json carries their latent keys) convert with their J range and compute their forward; what
we cannot run is refused in one line naming the key; our exports write their keys with their
meaning (and are still read in the older list format)."""

import importlib.util
import json
import math
import os

import pytest
import torch

from hf_tiny import hf_model, rel_err
from tiny import THEIR_RANGE, ids, latent_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What their loader writes for the PonderLM-2 script (scripts/train_ponderlm2_llama_410m.sh).
THEIRS = dict(num_latent_thoughts=1, num_jacobi_iterations=3, random_jacobi_iterations=True, interpolation=False,
              interpolation_use_topk=False, scale_embeds=True, recurrent_model=True, output_hidden_states=False)


def test_family_ranges_are_the_authors():
    from megatron_latent.config import model

    assert all(tuple(model.default_jacobi_iters(a)) == r for a, r in THEIR_RANGE.items())


def _their_folder(root, arch, **keys):
    path = os.path.join(str(root), f"theirs-{arch}")
    hf_model(arch).save_pretrained(path)
    conf_path = os.path.join(path, "config.json")
    with open(conf_path) as f:
        conf = json.load(f)
    conf.update({**THEIRS, **keys})
    conf = {k: v for k, v in conf.items() if v is not None}  # None: the key is absent
    with open(conf_path, "w") as f:
        json.dump(conf, f)
    return path


def _their_logits(hf, x, n, j, scale):
    """The authors' PonderLM-2 eval forward (modeling_gpt_neox.py / modeling_llama.py, interpolation
    off), written on the stock model: stages interleaved per token at the token's position id,
    N growth passes, J Jacobi passes, a final pass; logits of slot N."""
    emb = hf.get_input_embeddings()(x)
    if scale:
        emb = emb * math.sqrt(2.5 * hf.config.hidden_size)
    b, length = x.shape
    pos = torch.arange(length).expand(b, length)

    def run(stages):
        g = len(stages)
        out = hf.base_model(inputs_embeds=torch.stack(stages, 2).flatten(1, 2),
                            position_ids=pos.repeat_interleave(g, 1),
                            attention_mask=torch.ones(b, length * g, dtype=torch.long)).last_hidden_state
        return out.unflatten(1, (length, g))

    stages = [emb]
    for k in range(n):
        out = run(stages)
        stages = [emb] + [out[:, :, i] for i in range(k + 1)]
    for _ in range(j if n else 0):
        out = run(stages)
        stages = [emb] + [out[:, :, i] for i in range(n)]
    with torch.no_grad():
        return hf.get_output_embeddings()(run(stages)[:, :, n])


@pytest.mark.parametrize("arch", ["gpt-neox", "llama"])
def test_their_checkpoint_converts_and_computes_their_forward(tmp_path, arch, single_rank):
    import transformers

    from megatron_latent.checkpoint_layout import read_model_config
    from megatron_latent.hf.convert import convert_hf_to_checkpoint
    from megatron_latent.hf.export import read_checkpoint

    hf_dir = _their_folder(tmp_path, arch)
    convert_hf_to_checkpoint(hf_dir, str(tmp_path / "ckpt"))
    cfg = read_model_config(str(tmp_path / "ckpt"))
    lat = cfg.latent
    assert (lat.num_latent_thoughts, lat.jacobi_iters, lat.jacobi_iters_eval, lat.scale_embeddings) == (
        1, THEIR_RANGE[arch], 3, True)
    _, full, _ = read_checkpoint(str(tmp_path / "ckpt"))
    model = latent_model(cfg, full)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    assert type(hf).__name__ in ("GPTNeoXForCausalLM", "LlamaForCausalLM")  # their weights are the stock class's
    x = ids()
    with torch.no_grad():
        got = model(x, torch.arange(x.shape[1]).expand_as(x), None)[..., : hf.config.vocab_size]
        ref = _their_logits(hf, x, 1, 3, True)
        vanilla = hf(x).logits
    err = rel_err(got, ref)
    print(f"\n{arch}: |ours - theirs| / max {err:.1e}, thoughts move logits by {rel_err(vanilla, ref):.2f}")
    assert err < 1e-5
    assert rel_err(vanilla, ref) > 1e-2  # the thoughts and the scale matter: the check above can fail


# What their loader writes for the PonderLM script (scripts/train_ponderlm_llama_1_4b.sh): the
# PonderLM-2 keys with interpolation true, 3 steps, J neither random nor set (their defaults).
THEIR_PONDERLM = dict(num_latent_thoughts=3, interpolation=True, random_jacobi_iterations=False)


def _their_ponder_logits(hf, x, k, arch, residual=False):
    """Their PonderLM forward (modeling_llama_orin.py / modeling_gpt_neox_addhidden.py, the
    recurrent_model branch), written on the stock model: e0 (LLaMA: times sqrt(H)); K full
    forwards, each giving the next input e0 (residual: the input) + softmax(lm_head(h)) @ (E
    sqrt(H)) (LLaMA) or input + h (GPT-NeoX); the logits of one more forward."""
    weight = hf.get_input_embeddings().weight
    scale = math.sqrt(hf.config.hidden_size) if arch == "llama" else 1.0
    e0 = hf.get_input_embeddings()(x) * scale
    current = e0
    with torch.no_grad():
        for _ in range(k):
            h = hf.base_model(inputs_embeds=current).last_hidden_state
            if arch == "gpt-neox":
                current = current + h
            else:
                mix = torch.softmax(hf.get_output_embeddings()(h), dim=-1) @ (weight * scale)
                current = (current if residual else e0) + mix
        return hf.get_output_embeddings()(hf.base_model(inputs_embeds=current).last_hidden_state)


@pytest.mark.parametrize("arch,residual", [("llama", False), ("llama", True), ("gpt-neox", False)])
def test_their_ponderlm_checkpoint_converts_with_its_patch_method(tmp_path, capsys, arch, residual, single_rank):
    import transformers

    from megatron_latent.checkpoint_layout import read_model_config
    from megatron_latent.hf.export import read_checkpoint

    hf_dir = _their_folder(tmp_path, arch, **THEIR_PONDERLM,
                           residual_interpolated_embeds=True if residual else None)
    # Without the method the keys are ambiguous (PonderLM-2 with 3 interpolated thoughts reads the same).
    assert _tool(["--hf-dir", hf_dir, "--save", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--patch-method ponderlm" in err and not (tmp_path / "refused").exists()
    assert ("residual_interpolated_embeds: a key of their PonderLM" if residual else "write the same keys") in err
    assert _tool(["--hf-dir", hf_dir, "--save", str(tmp_path / "ckpt"), "--patch-method", "ponderlm"]) == 0
    cfg = read_model_config(str(tmp_path / "ckpt"))
    lat = cfg.latent
    assert (lat.method, lat.num_ponder_steps, lat.ponder_residual) == ("ponder", 3, residual)
    assert (lat.ponder_feedback, lat.scale_embeddings) == (("hidden", False) if arch == "gpt-neox"
                                                          else ("interpolated", True))
    _, full, _ = read_checkpoint(str(tmp_path / "ckpt"))
    model = latent_model(cfg, full)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    x = ids()
    with torch.no_grad():
        got = model(x, torch.arange(x.shape[1]).expand_as(x), None)[..., : hf.config.vocab_size]
        vanilla = hf(x).logits
    ref = _their_ponder_logits(hf, x, 3, arch, residual)
    assert rel_err(got, ref) < 1e-5
    assert rel_err(vanilla, ref) > 1e-2  # the steps matter: the check above can fail


def test_their_loop_and_pause_checkpoints_by_patch_method():
    import transformers

    from megatron_latent.hf.authors import AuthorsConfigError
    from megatron_latent.hf.mapping import config_from_hf

    conf = hf_model("llama").config.to_dict()
    conf.update({**THEIRS, "num_latent_thoughts": 3})
    c = transformers.LlamaConfig.from_dict(conf)
    assert config_from_hf(c).latent.method == "latent"  # no patch_method: their default, PonderLM-2
    c.patch_method = "loop"
    lat = config_from_hf(c).latent
    assert (lat.method, lat.num_extra_loops, lat.scale_embeddings) == ("loop", 3, True)
    c.patch_method = "pause"
    with pytest.raises(AuthorsConfigError, match="patch_method pause: the authors' pause embedding row"):
        config_from_hf(c)
    c.patch_method, c.interpolation = "ours", True
    lat = config_from_hf(c).latent
    assert (lat.method, lat.num_latent_thoughts) == ("interpolated", 3)


@pytest.mark.parametrize("keys, want", [
    (dict(random_jacobi_iterations=False, num_jacobi_iterations=2), ((2, 2), 2, True)),
    (dict(random_jacobi_iterations=None, num_jacobi_iterations=None), ((3, 3), 3, True)),  # their getattr defaults
    (dict(scale_embeds=False, num_latent_thoughts=2), ((2, 4), 3, False)),
])
def test_their_keys_map_to_our_settings(keys, want):
    import transformers

    from megatron_latent.hf.mapping import config_from_hf

    conf = hf_model("gpt-neox").config.to_dict()
    conf.update({**THEIRS, **keys})
    c = transformers.GPTNeoXConfig.from_dict({k: v for k, v in conf.items() if v is not None})
    lat = config_from_hf(c).latent
    assert (lat.jacobi_iters, lat.jacobi_iters_eval, lat.scale_embeddings) == want


def _tool(argv):
    spec = importlib.util.spec_from_file_location("convert_from_hf", os.path.join(ROOT, "tools", "convert_from_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.mark.parametrize("keys, msg", [
    (dict(interpolation=True), "config.json interpolation true"),
    (dict(interpolation=None), "config.json interpolation true (or absent"),
    (dict(recurrent_model=False), "config.json recurrent_model false (or absent) with 1 latent thought(s)"),
    (dict(recurrent_model=None, num_latent_thoughts=0),
     "recurrent_model false (or absent) with 0 latent thought(s), scale_embeds true"),
    (dict(pause_token_id=50288), "config.json pause_token_id: a Pause Token baseline model"),
    (dict(random_jacobi_iterations="yes"), "config.json random_jacobi_iterations 'yes'"),
    (dict(scale_embeds="true"), "config.json scale_embeds 'true': expected true or false"),
])
def test_unsupported_their_configs_are_refused_in_one_line(tmp_path, capsys, keys, msg):
    hf_dir = _their_folder(tmp_path, "llama", **keys)
    capsys.readouterr()
    assert _tool(["--hf-dir", hf_dir, "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and msg in err, err
    assert not (tmp_path / "out").exists()


def test_their_vanilla_run_converts_as_vanilla(tmp_path, capsys):
    """Their vanilla script's loader defaults (interpolation true, recurrent_model false, N=0) are a
    stock model: converted as N=0."""
    hf_dir = _their_folder(tmp_path, "llama", num_latent_thoughts=0, interpolation=True, recurrent_model=False,
                           scale_embeds=False, random_jacobi_iterations=False)
    assert _tool(["--hf-dir", hf_dir, "--save", str(tmp_path / "out")]) == 0
    assert "N=0" in capsys.readouterr().out


@pytest.mark.parametrize("arch, j, random, extra", [
    ("gpt-neox", (2, 4), True, None),   # their family range
    ("llama", (2, 3), True, None),
    ("llama", (3, 3), False, None),     # fixed J = the evaluation J
    ("gpt-neox", (1, 5), True, [1, 5]),  # neither: our own key carries it
    ("llama", (4, 4), False, [4, 4]),
])
def test_export_writes_their_keys_with_their_meaning(arch, j, random, extra):
    import transformers

    from megatron_latent.hf.export import hf_config_dict
    from megatron_latent.hf.mapping import config_from_hf
    from tiny import small_config

    cfg = small_config(arch, 1, jacobi_iters=j, jacobi_iters_eval=3)
    d = hf_config_dict(cfg)
    assert d["random_jacobi_iterations"] is random and d.get("jacobi_iters_range") == extra
    assert d["interpolation"] is False and d["recurrent_model"] is True and d["scale_embeds"] is True
    assert d["num_latent_thoughts"] == 1 and d["num_jacobi_iterations"] == 3
    base = d["model_type"][len("latent_"):]
    back = config_from_hf(transformers.CONFIG_MAPPING[base].from_dict({**d, "model_type": base}))
    assert back.latent == cfg.latent
    # Read as the authors' code reads it (no jacobi_iters_range): their J for their families.
    d.pop("jacobi_iters_range", None)
    d.pop("latent_prefill")
    theirs = config_from_hf(transformers.CONFIG_MAPPING[base].from_dict({**d, "model_type": base})).latent
    assert theirs.jacobi_iters == (THEIR_RANGE[arch] if random else (3, 3))


def test_our_earlier_exports_still_read():
    """Exports before this wrote random_jacobi_iterations as [lo, hi] and no interpolation /
    recurrent_model keys (they carry latent_prefill)."""
    import transformers

    from megatron_latent.hf.export import hf_config_dict
    from megatron_latent.hf.mapping import config_from_hf
    from tiny import small_config

    cfg = small_config("gpt-neox", 2, jacobi_iters=(1, 5), jacobi_iters_eval=4)
    d = hf_config_dict(cfg)
    for key in ("interpolation", "recurrent_model", "jacobi_iters_range"):
        d.pop(key)
    d.update(random_jacobi_iterations=[1, 5], model_type="gpt_neox")
    assert config_from_hf(transformers.GPTNeoXConfig.from_dict(d)).latent == cfg.latent


def test_remote_code_refuses_what_it_cannot_run():
    from megatron_latent.hf import modeling_latent as ml

    small = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=32)
    ml.LatentLlamaForCausalLM(ml.LatentLlamaConfig(**small))  # the defaults run
    # Interpolated thoughts run (tests/test_hf_methods.py); methods are exclusive; the pause row is the last.
    ml.LatentLlamaForCausalLM(ml.LatentLlamaConfig(interpolation=True, **small))
    with pytest.raises(ValueError, match="num_latent_thoughts and num_extra_loops: .* exclusive"):
        ml.LatentLlamaForCausalLM(ml.LatentLlamaConfig(num_extra_loops=1, **small))
    with pytest.raises(ValueError, match="pause_token_id 3: expected the last row, 31"):
        ml.LatentLlamaForCausalLM(ml.LatentLlamaConfig(num_latent_thoughts=0, num_pause_tokens=1, pause_token_id=3,
                                                       **small))
    with pytest.raises(ValueError, match="recurrent_model false"):
        ml.LatentLlamaForCausalLM(ml.LatentLlamaConfig(recurrent_model=False, **small))
