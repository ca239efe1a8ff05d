"""tools/plot_metrics.py: curves of several runs into one PNG; bad files are one clear error."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, losses):
    with open(path, "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"iteration": i, "train/loss": loss}) + "\n")
            if i % 2 == 0:
                f.write(json.dumps({"iteration": i, "valid/loss": loss + 0.1}) + "\n")


def _tool(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), *argv],
                          capture_output=True, text=True)


def test_plot_two_runs(tmp_path):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "curves.png"
    _write(a, [5.0, 4.0, 3.5, 3.2])
    _write(b, [5.0, 3.8, 3.1, 2.9])
    proc = _tool("--run", f"vanilla={a}", "--run", f"latent={b}", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not any(p.name.endswith(".tmp.png") for p in tmp_path.iterdir())


def test_bad_line_names_file_and_line(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"iteration": 1, "train/loss": 3.0}\nnot json\n')
    proc = _tool("--run", f"x={a}", "--output", str(tmp_path / "o.png"), "--keys", "train/loss")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {a}:2: not JSON (Expecting value)"
    assert not (tmp_path / "o.png").exists()


def test_a_resumed_run_rewrites_the_steps_it_redoes(tmp_path):
    """Steps 4-5 of an interrupted run (its last checkpoint was 3) are dropped when the resumed
    run opens the log, so metrics.jsonl holds one history."""
    from megatron_latent.training.metrics import MetricsWriter, read_metrics

    first = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 6):
        first.write(step, {"train/loss": 10.0 - step})
    first.close()
    resumed = MetricsWriter(str(tmp_path), enabled=True, start_iteration=3)
    for step in range(4, 7):
        resumed.write(step, {"train/loss": 20.0 - step})
    resumed.close()
    steps, values = read_metrics(str(tmp_path / "metrics.jsonl"), "train/loss")
    assert list(steps) == [1, 2, 3, 4, 5, 6]
    assert list(values) == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]
