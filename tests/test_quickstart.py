"""The quickstart's parts: the standard-library corpus and tokenizer (data/pycorpus.py), the
decoding FLOP count, and tools/compare_runs.py on synthetic run directories (numbers asserted).
The whole examples/quickstart.sh is the slow test at the end."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_latent.analysis.compare import format_table, plot_valid_loss, summarize_run, verdict
from megatron_latent.config import ModelConfig
from megatron_latent.data.pycorpus import (
    EOD_TOKEN,
    stdlib_documents,
    stdlib_files,
    stdlib_root,
    train_bpe_tokenizer,
    write_stdlib_corpus,
)
from megatron_latent.models.flops import decoder_pass_flops, model_decode_flops, model_step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ corpus
def _fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "a.py").write_text('"""Module a.\n\n    Indented."""\n\ndef f():\n    """Function f."""\n    return 1\n')
    (root / "pkg" / "b.py").write_text("x = 1\n")  # no docstrings: the source only
    (root / "pkg" / "bad.py").write_bytes(b"s = '\xff'\n")  # not UTF-8: left out
    (root / "test" / "test_a.py").write_text('"""Skipped."""\n')
    (root / "notes.txt").write_text("not python")


def test_stdlib_documents_of_a_tree(tmp_path):
    _fake_stdlib(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in stdlib_files(str(tmp_path))] == ["a.py", "pkg/b.py", "pkg/bad.py"]
    docs = list(stdlib_documents(str(tmp_path)))
    assert [(d["meta"]["pile_set_name"], d["meta"]["path"]) for d in docs] == [
        ("python-stdlib-docstrings", "a.py"), ("python-stdlib-source", "a.py"), ("python-stdlib-source", "pkg/b.py")]
    assert docs[0]["text"] == "Module a.\n\nIndented.\n\nFunction f."
    assert docs[2]["text"] == "x = 1\n"


def test_write_stdlib_corpus_and_tokenizer(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "c.jsonl"
    stats = write_stdlib_corpus(str(out), root=str(tmp_path / "lib"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats == {"documents": 3, "docstring_documents": 1,
                     "bytes": sum(len(r["text"].encode()) for r in records)}
    assert sorted(r["text"] for r in records) == sorted(d["text"] for d in stdlib_documents(str(tmp_path / "lib")))
    # max_bytes keeps whole documents only, within the bound
    small = write_stdlib_corpus(str(out), max_bytes=20, root=str(tmp_path / "lib"))
    assert 0 < small["bytes"] <= 20 and small["documents"] < 3
    size, eod = train_bpe_tokenizer([str(out)], str(tmp_path / "tok.json"), vocab_size=300)
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(tmp_path / "tok.json"))
    assert (eod, tok.eod_token, tok.vocab_size) == (EOD_TOKEN, EOD_TOKEN, size) and 257 <= size <= 300
    text = "def f():\n    return 'héllo'\n"
    assert tok.detokenize(tok.tokenize(text)) == text  # byte-level: every text round-trips


def test_the_installed_stdlib_is_found():
    rel = {os.path.relpath(p, stdlib_root()) for p in stdlib_files()}
    assert {"json/__init__.py", "os.py"} <= rel
    assert not any(p.startswith(("test/", "idlelib/", "site-packages/")) for p in rel)


# ------------------------------------------------------------------ decoding FLOPs
@pytest.mark.parametrize("n", [0, 1, 2])
def test_decode_flops_sum_to_the_causal_forward(n):
    # Over a whole sequence, decoding does every slot's matmuls once and attention over the lower
    # triangle of the (N+1) S slots; the output layer once per token.
    cfg = ModelConfig(name="d", arch="llama", num_layers=4, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=176, vocab_size=512, seq_length=16)
    cfg = cfg.replace(num_latent_thoughts=n)
    s, vocab = 16, 512
    m = (n + 1) * s
    full = decoder_pass_flops(m, hidden=64, num_layers=4, ffn_hidden=176, num_heads=4, num_query_groups=2,
                              gated_mlp=True)
    causal = full - 4 * 4 * m * m * 64 + 4 * 4 * 64 * m * (m + 1) // 2
    total = sum(model_decode_flops(cfg, p) for p in range(s))
    assert total == causal + 2 * s * 64 * vocab


# ------------------------------------------------------------------ compare_runs
def _run_dir(root, cfg, seed, iters, gbs, seq, valid, elapsed):
    ckpt, logs = root / "ckpt", root / "logs"
    it = ckpt / f"iter_{iters:07d}"
    it.mkdir(parents=True)
    logs.mkdir()
    (ckpt / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{iters}\n")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"iteration": iters, "extra": {"consumed_train_samples": iters * gbs, "model_config": cfg.to_dict(),
                                              "args": {"seed": seed, "seq_length": seq, "global_batch_size": gbs}}},
               it / "common.pt")
    with open(logs / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(valid, 1):
            step = i * iters // len(valid)
            f.write(json.dumps({"iteration": step, "train/loss": loss + 0.2, "train/elapsed_s": elapsed * step / iters})
                    + "\n")
            f.write(json.dumps({"iteration": step, "valid/loss": loss}) + "\n")
    return str(root)


CFG = ModelConfig(name="t", arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=64, vocab_size=256, seq_length=64)


def _expected_train_flops(cfg, seed, iters, gbs, seq):
    n = cfg.latent.num_latent_thoughts
    js = [random.Random(seed * 1_000_003 + s).randint(2, 3) if n else 0 for s in range(1, iters + 1)]
    flops = sum(model_step_flops(cfg, seq, j) for j in js) * gbs
    return flops, js


def test_summary_counts_tokens_and_exact_flops(tmp_path):
    latent = CFG.replace(num_latent_thoughts=1)
    run = summarize_run(_run_dir(tmp_path / "lat", latent, 7, 12, 8, 32, [5.0, 4.0, 3.5], 30.0), "latent")
    expected, js = _expected_train_flops(latent, 7, 12, 8, 32)
    assert set(js) == {2, 3}  # the steps drew different J: an average would not match
    assert (run.train_tokens, run.train_flops, run.parameters) == (12 * 8 * 32, expected, latent.num_parameters())
    assert run.inference_flops_per_token == pytest.approx(
        sum(model_decode_flops(latent, p) for p in range(32)) / 32, rel=1e-12)
    assert (run.valid_steps, run.valid_losses, run.valid_loss, run.wall_time_s) == ([4, 8, 12], [5.0, 4.0, 3.5],
                                                                                      3.5, 30.0)


def test_table_groups_seeds_and_judges(tmp_path):
    runs = [summarize_run(_run_dir(tmp_path / f"v{s}", CFG, s, 10, 4, 16, [4.0, loss], 10.0 + s), "vanilla")
            for s, loss in ((1, 3.0), (2, 3.2))]
    runs.append(summarize_run(_run_dir(tmp_path / "lat", CFG.replace(num_latent_thoughts=1), 1, 10, 4, 16,
                                       [4.0, 3.05], 50.0), "latent"))
    table = format_table(runs).splitlines()
    assert len(table) == 4  # header, rule, the two seeds as one row, the latent run
    assert table[2].startswith("| vanilla (2 seeds) | vanilla | 2 | 32 |")
    assert f"| 3.1 ± 0.14 | {math.exp(3.0) / 2 + math.exp(3.2) / 2:.4g} ± " in table[2]
    assert f"| {10 * 4 * 16:,} |" in table[3] and "| 3.05 | " in table[3]
    assert len(format_table(runs, group_seeds=False).splitlines()) == 5
    v = verdict(runs[1:], "latent", ["vanilla"])
    assert v.startswith("latent beats vanilla (3.0500 vs 3.2000, -0.1500;")
    out = tmp_path / "curves.png"
    plot_valid_loss(runs, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tool(capsys, *argv):
    # In this process: the package is imported already (a subprocess would import megatron again).
    spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(ROOT, "tools", "compare_runs.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_compare_runs_tool(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", CFG, 1, 10, 4, 16, [4.0, 3.0], 10.0)
    b = _run_dir(tmp_path / "b", CFG.replace(num_latent_thoughts=1), 1, 10, 4, 16, [4.0, 3.3], 20.0)
    rc, out, err = _tool(capsys, a, b, "--label", "vanilla", "latent", "--latent", "latent", "--baselines",
                         "vanilla", "--plot", str(tmp_path / "p.png"))
    assert rc == 0, err
    assert "latent does not beat vanilla (3.3000 vs 3.0000, +0.3000;" in out
    assert (tmp_path / "p.png").is_file()
    rc, out, err = _tool(capsys, str(tmp_path / "missing"))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no model_config.json in it or in ckpt/ (a run directory holds its "
        "checkpoint and metrics.jsonl)"]


# ------------------------------------------------------------------ the whole script
@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--out", str(tmp_path / "qs"),
                           "--train-iters", "20"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the continuations agree (24 tokens)" in proc.stdout
    table = (tmp_path / "qs" / "comparison.md").read_text()
    assert table.count(f"| {20 * 16 * 128:,} |") == 3
    assert (tmp_path / "qs" / "valid_loss.png").is_file()
    rerun = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--out", str(tmp_path / "qs"),
                            "--train-iters", "20"], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0 and rerun.stdout.count("finished already") == 3
