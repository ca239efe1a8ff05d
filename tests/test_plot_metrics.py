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


def test_wildcard_panels_draw_residuals_and_accuracies(tmp_path):
    """A wildcard key is a panel of every matching key (the Jacobi residuals, the downstream
    accuracies); one no run has is left out; a plain key no run has is one clear error."""
    import matplotlib.pyplot as plt

    a = tmp_path / "a.jsonl"
    with open(a, "w") as f:
        for i in range(1, 5):
            f.write(json.dumps({"iteration": i, "train/loss": 5.0 - i, "thoughts/jacobi_residual_1": 0.1 / i,
                                "thoughts/jacobi_residual_2": 0.01 / i}) + "\n")
        f.write(json.dumps({"iteration": 4, "valid/loss": 1.5, "downstream/piqa/acc": 0.6,
                            "downstream/piqa/acc_stderr": 0.01, "downstream/sciq/acc": 0.7}) + "\n")
    from megatron_latent.tools import plot_metrics as tool

    panels = tool._panels({"x": str(a)}, tool.DEFAULT_PANELS)
    assert [(title, [c[0] for c in curves]) for title, curves in panels] == [
        ("train/loss", ["x"]), ("valid/loss", ["x"]), ("thoughts/jacobi_residual_*", ["1", "2"]),
        ("downstream/*/acc", ["piqa/acc", "sciq/acc"])]
    drawn = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, path, **kw):
        drawn.extend((ax.get_title(), ax.get_yscale(), len(ax.lines)) for ax in fig.axes if ax.get_visible())
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = savefig
    try:
        tool.plot_metrics({"x": str(a)}, str(tmp_path / "o.png"))
    finally:
        plt.Figure.savefig = real_savefig
    assert ("thoughts/jacobi_residual_*", "log", 2) in drawn and ("downstream/*/acc", "linear", 2) in drawn
    proc = _tool("--run", f"x={a}", "--output", str(tmp_path / "p.png"), "--keys", "train/loss", "test/loss")
    assert proc.returncode == 2 and "no 'test/loss' values" in proc.stderr
