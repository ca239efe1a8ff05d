"""Export to Hugging Face: the exported model computes the megatron model's logits (every family,
N in {0, 1, 2}, checkpoints saved at TP=1, TP=2 and PP=2); N=0 loads in the stock class without
remote code; exact prefill is megatron's sequential reference and Jacobi-to-tolerance reaches it;
the folder is written atomically and never overwritten without --force."""

import ast
import importlib.util
import json
import os
import shutil

import pytest
import torch

from multirank import run_on_ranks
from tiny import (
    ARCHS,
    VOCAB,
    L,
    forward_pipeline,
    full_weights,
    ids,
    latent_model,
    megatron_logits,
    positions,
    save,
    small_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK = {"gpt2": "GPT2LMHeadModel", "gpt-neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


def _tool(argv):
    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools", "convert_to_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _load(hf_dir, latent):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=latent).eval()


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_megatron(tmp_path, arch, n):
    from megatron_latent.hf.export import export_to_hf
    from megatron_latent.inference.reference import sequential_logits

    cfg = small_config(arch, n)
    model = latent_model(cfg)
    save(model, cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = _load(str(tmp_path / "hf"), latent=n > 0)
    x = ids()
    ref = megatron_logits(model, x)  # eval forward: growth, J=3 Jacobi passes, final pass
    with torch.no_grad():
        got = hf(x).logits
    assert got.shape == ref.shape and _err(got, ref) < 1e-5
    if n == 0:
        assert type(hf).__name__ == STOCK[arch]
        return
    exact = sequential_logits(model, x, positions(x))[..., :VOCAB]
    with torch.no_grad():
        ex = hf(x, latent_prefill="exact").logits
        tol = hf(x, latent_prefill="tolerance", jacobi_tolerance=1e-6)
        j0 = hf(x, num_jacobi_iterations=0).logits
    print(f"\n{arch} N={n}: |jacobi - megatron| {_err(got, ref):.1e}, |exact - sequential| {_err(ex, exact):.1e}, "
          f"tolerance: {tol.jacobi_iterations} iterations, |err| {_err(tol.logits, exact):.1e}; "
          f"J=0 {_err(j0, exact):.2f}")
    assert _err(ex, exact) < 1e-5
    assert _err(tol.logits, exact) < 1e-5 and 1 <= tol.jacobi_iterations <= n * L
    assert _err(j0, exact) > 1e-2  # the thoughts matter: the tests above can fail


def test_n0_loads_without_remote_code(tmp_path, single_rank):
    import transformers

    from megatron_latent.hf.export import export_to_hf

    cfg = small_config("llama", 0)
    save(latent_model(cfg), cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "modeling_latent.py").exists()
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "llama" and "auto_map" not in conf and "num_latent_thoughts" not in conf
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert type(model) is transformers.LlamaForCausalLM


def test_latent_export_needs_remote_code(tmp_path, single_rank):
    import transformers

    from megatron_latent.hf.export import export_to_hf

    cfg = small_config("gpt-neox", 1)
    save(latent_model(cfg), cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="bfloat16")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["num_latent_thoughts"] == 1 and conf["num_jacobi_iterations"] == 3 and conf["scale_embeds"] is True
    # The authors' keys with their meaning (tests/test_hf_authors.py has the cases).
    assert conf["interpolation"] is False and conf["recurrent_model"] is True
    assert isinstance(conf["random_jacobi_iterations"], bool)
    # Read by transformers 4.x too: legacy rotary names, the 4.x head name.
    assert (conf["rotary_pct"], conf["rotary_emb_base"]) == (cfg.rotary_percent, cfg.rotary_base)
    assert conf["model_type"] == "latent_gpt_neox" and conf["dtype"] == "bfloat16"
    # Never silently a vanilla model: without trust_remote_code the folder does not load.
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    # The shipped modeling file imports only torch and transformers.
    tree = ast.parse((tmp_path / "hf" / "modeling_latent.py").read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "contextlib", "dataclasses", "inspect", "math", "typing", "torch",
                        "transformers"}, imported
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_sharded_weights(tmp_path, single_rank):
    from megatron_latent.hf.export import export_to_hf

    cfg = small_config("gpt2", 1)
    model = latent_model(cfg)
    save(model, cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = _load(str(tmp_path / "hf"), latent=True)
    x = ids()
    with torch.no_grad():
        assert _err(hf(x).logits, megatron_logits(model, x)) < 1e-5


def test_refuses_overwrite_and_writes_atomically(tmp_path, single_rank, capsys):
    cfg = small_config("llama", 1)
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    save(latent_model(cfg), cfg, ckpt)
    assert _tool(["--load", ckpt, "--save", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    (out / "marker").write_text("old")
    assert _tool(["--load", ckpt, "--save", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exists; pass --force" in err and (out / "marker").exists()
    assert _tool(["--load", ckpt, "--save", str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no temporary folders left behind
    # Bad input: one line naming the flag, nothing written.
    for argv, msg in ((["--load", str(tmp_path / "nope")], "--load"),
                      (["--load", ckpt, "--iteration", "5"], "--iteration 5"),
                      (["--load", ckpt, "--tokenizer-model", str(tmp_path / "t.json")], "--tokenizer-model")):
        assert _tool(argv + ["--save", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err, err
        assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def test_tokenizer_files(tmp_path, single_rank):
    import transformers

    from data_fixtures import EOD, make_texts, train_hf_bpe
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer
    from megatron_latent.hf.export import export_to_hf

    tok_path = train_hf_bpe(str(tmp_path))
    ours = HuggingFaceTokenizer(tok_path)
    cfg = small_config("llama", 1, vocab_size=ours.vocab_size)
    save(latent_model(cfg), cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), tokenizer_model=tok_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    for text in make_texts(5, seed=3):
        assert tok(text)["input_ids"] == ours.tokenize(text)
    assert tok.eos_token == EOD and tok.eos_token_id == ours.eod
    model = _load(str(tmp_path / "hf"), latent=True)
    assert model.config.eos_token_id == ours.eod and model.generation_config.eos_token_id == ours.eod


# ------------------------------------------------------------------------ TP=2 and PP=2 saves
def _save_parallel(root):
    """TP=2: latent N=1 models (logits at TP=2, then saved). PP=2: N=0 weights, pipeline logits."""
    import torch.distributed as dist

    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.parallel.initialize import initialize_model_parallel

    out = {}
    initialize_model_parallel(2, 1)
    for arch in ARCHS:
        cfg = small_config(arch, 1)
        model = latent_model(cfg)
        out[("tp2", arch)] = megatron_logits(model, ids())
        save(model, cfg, os.path.join(root, f"tp2-{arch}"))
    initialize_model_parallel(1, 2)
    for arch in ARCHS:
        cfg = small_config(arch, 0)
        model = build_gpt_model(cfg, parallel_output=False).eval()
        load_full_into_model(model, full_weights(cfg), cfg)
        logits = forward_pipeline(model, ids())
        if logits is not None:
            out[("pp2", arch)] = logits[..., :VOCAB]
        save(model, cfg, os.path.join(root, f"pp2-{arch}"))
    dist.barrier()
    return out


def test_export_from_tp2_and_pp2(tmp_path, single_rank):
    from safetensors.torch import load_file

    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.hf.export import export_to_hf
    from megatron_latent.hf.mapping import megatron_to_hf

    root = str(tmp_path)
    ranks = run_on_ranks(_save_parallel, 2, root, timeout=400)
    results = {**ranks[0], **ranks[1]}
    x = ids()
    for arch in ARCHS:
        # TP=2 latent checkpoint: the export computes the TP=2 model's logits.
        export_to_hf(os.path.join(root, f"tp2-{arch}"), os.path.join(root, f"hf-tp2-{arch}"))
        with torch.no_grad():
            got = _load(os.path.join(root, f"hf-tp2-{arch}"), latent=True)(x).logits
        assert _err(got, results[("tp2", arch)]) < 1e-5, arch
        # PP=2 checkpoint: stock export equals the pipeline's logits ...
        pp = os.path.join(root, f"pp2-{arch}")
        export_to_hf(pp, os.path.join(root, f"hf-pp2-{arch}"))
        with torch.no_grad():
            got = _load(os.path.join(root, f"hf-pp2-{arch}"), latent=False)(x).logits
        assert _err(got, results[("pp2", arch)]) < 1e-5, arch
        # ... and its tensors are exactly the weights that were loaded into the pipeline stages.
        cfg0 = small_config(arch, 0)
        want, _ = megatron_to_hf(full_weights(cfg0), cfg0)
        have = load_file(os.path.join(root, f"hf-pp2-{arch}", "model.safetensors"))
        if "embed_out.weight" in have:  # GPT-NeoX's head is stored under its 4.x name
            have["lm_head.weight"] = have.pop("embed_out.weight")
        assert set(have) == set(want) - ({"lm_head.weight"} if cfg0.tie_embeddings else set())
        assert all(torch.equal(have[k], want[k]) for k in have)
        # The same PP=2 checkpoint read as a latent N=1 checkpoint (N changes the forward only).
        latent_pp = os.path.join(root, f"pp2-{arch}-n1")
        shutil.copytree(pp, latent_pp)
        cfg1 = small_config(arch, 1)
        write_model_config(cfg1, latent_pp)
        export_to_hf(latent_pp, os.path.join(root, f"hf-pp2-{arch}-n1"))
        with torch.no_grad():
            got = _load(os.path.join(root, f"hf-pp2-{arch}-n1"), latent=True)(x).logits
        assert _err(got, megatron_logits(latent_model(cfg1), x)) < 1e-5, arch


def test_latent_export_converts_back(tmp_path, single_rank):
    """convert_from_hf reads a latent export (without running its code): same N, same weights."""
    from megatron_latent.hf.convert import convert_hf_to_checkpoint
    from megatron_latent.hf.export import export_to_hf, read_checkpoint

    cfg = small_config("gpt-neox", 2)
    full = full_weights(cfg)
    save(latent_model(cfg, full), cfg, str(tmp_path / "ckpt"))
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    back = convert_hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back"))
    got = (back.latent.num_latent_thoughts, back.latent.scale_embeddings, back.latent.jacobi_iters_eval)
    assert got == (2, True, 3)
    _, again, _ = read_checkpoint(str(tmp_path / "back"))
    assert sorted(again) == sorted(full)
    for k in full:  # the padding rows of the vocabulary are not exported (they come back as zeros)
        rows = VOCAB if k in ("embedding.word_embeddings.weight", "output_layer.weight") else None
        assert torch.equal(again[k][:rows], full[k][:rows]), k
