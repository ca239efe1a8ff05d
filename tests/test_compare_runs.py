"""tools/compare_runs.py and the library under it (analysis/compare.py) on synthetic run
directories: tokens and exact FLOPs per run, the table grouping seeds, the verdict, the plot, and
the tool's one-line error (numbers asserted)."""

import importlib.util
import json
import math
import os
import random

import pytest
import torch

from megatron_latent.analysis.compare import format_table, plot_valid_loss, summarize_run, verdict
from megatron_latent.config import ModelConfig
from megatron_latent.models.flops import model_decode_flops, model_step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
