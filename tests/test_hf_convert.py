"""tools/convert_from_hf.py: an HF folder becomes a checkpoint that loads at TP=2 and computes
the HF logits; bad folders and layouts fail with one line naming the problem, writing nothing."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

from hf_tiny import VOCAB, hf_logits, hf_model, rel_err, tokens
from multirank import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_from_hf.py")


def _tool_main(argv):
    spec = importlib.util.spec_from_file_location("convert_from_hf", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _load_and_run(ckpt, hf_dir):
    import transformers

    from megatron_latent.checkpoint_layout import read_model_config
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training.checkpointing import load_checkpoint

    initialize_model_parallel(2, 1)
    cfg = read_model_config(ckpt)
    model = build_gpt_model(cfg, parallel_output=False).eval()
    info = load_checkpoint(ckpt, [model])
    ids = tokens()
    with torch.no_grad():
        got = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., :VOCAB]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    return {"err": rel_err(got, hf_logits(hf, ids)), "n": cfg.latent.num_latent_thoughts,
            "iteration": info["iteration"]}


def test_convert_then_load_at_tp2(tmp_path):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf_model("llama").save_pretrained(hf_dir)
    proc = subprocess.run(
        [sys.executable, TOOL, "--hf-dir", hf_dir, "--save", ckpt, "--num-latent-thoughts", "1",
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    for rank_out in run_on_ranks(_load_and_run, 2, ckpt, hf_dir, timeout=300):
        # N is recorded; it changes the latent forward, not the weights, so the plain GPTModel
        # forward of the loaded weights is HF's.
        assert rank_out["n"] == 1 and rank_out["iteration"] == 0
        assert rank_out["err"] < 1e-5


def test_unsupported_architecture_one_line(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    assert _tool_main(["--hf-dir", str(hf_dir), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "unsupported architecture MistralForCausalLM" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_impossible_layout_names_flag(tmp_path, capsys):
    hf_dir = str(tmp_path / "hf")
    hf_model("llama").save_pretrained(hf_dir)
    capsys.readouterr()
    assert _tool_main(["--hf-dir", hf_dir, "--save", str(tmp_path / "out"), "--tensor-model-parallel-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tensor-model-parallel-size 4 does not divide the num_query_groups 2" in err
    assert not (tmp_path / "out").exists()


def test_missing_config_names_file(tmp_path, capsys):
    assert _tool_main(["--hf-dir", str(tmp_path), "--save", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
