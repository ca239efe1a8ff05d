"""The whole examples/quickstart.sh (slow): corpus, tokenizer, three trained models, the comparison
table and plot, the export and both continuations, and a rerun that finds every run finished.
Its parts are tested on their own: test_pycorpus.py, test_compare_runs.py, test_flops.py."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
