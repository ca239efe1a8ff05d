"""benchmarks/bench_reference.py: the interval it reports for the median per-round ratio
(analysis.stats.median_interval), its own side end to end (the authors' side needs their modeling
file, which is not part of the repository), and a reference side that fails."""

import math
import os
import subprocess
import sys

import pytest

from megatron_latent.analysis.stats import median_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _below(n, k):
    """P(Binomial(n, 1/2) < k)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def test_median_interval_is_the_classical_order_statistics():
    m = median_interval
    values = [float(i) for i in range(1, 61)]
    # Textbook 95% intervals for the median: the 6th and 15th of 20, the 22nd and 39th of 60.
    assert m(values[:20]) == (6.0, 15.0)
    assert m(values) == (22.0, 39.0)
    assert m(values[:6]) == (1.0, 6.0)
    assert m(values[:5]) is None  # even (min, max) covers only 1 - 2/32 < 95%
    # Unsorted input, and ratios rather than ranks.
    assert m([1.05, 0.97, 1.02, 0.99, 1.10, 1.01, 0.95]) == (0.95, 1.10)


@pytest.mark.parametrize("n", range(6, 81))
def test_median_interval_covers_95_percent_and_no_more_than_needed(n):
    lo, hi = median_interval([float(i) for i in range(1, n + 1)])
    k = int(lo)
    assert hi == n + 1 - k
    assert 1 - 2 * _below(n, k) >= 0.95
    assert 1 - 2 * _below(n, k + 1) < 0.95  # the next narrower pair would not cover


def test_ours_only_run_prints_steps_and_the_exact_flop_ratio():
    from megatron_latent.config import ModelConfig
    from megatron_latent.models.flops import model_step_flops

    argv = ["--ours-only", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
            "--seq-length", "16", "--micro-batch-size", "2", "--rounds", "2", "--threads", "1", "--jacobi", "2"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_reference.py"), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("ours "))
    vanilla, latent, ratio, flop = map(float, row[1:])
    assert vanilla > 0 and latent > vanilla  # four passes against one
    # The times are printed to 1 ms, the ratio of the unrounded medians to 0.01.
    assert (latent - 5e-4) / (vanilla + 5e-4) - 0.005 <= ratio <= (latent + 5e-4) / (vanilla - 5e-4) + 0.005
    cfg = ModelConfig(name="bench", arch="gpt-neox", num_layers=2, hidden_size=32, num_attention_heads=2,
                      ffn_hidden_size=128, vocab_size=256, seq_length=16, rotary_percent=0.25)

    def f(n, j):
        return model_step_flops(cfg.replace(num_latent_thoughts=n), 16, j)

    assert flop == pytest.approx(f(1, 2) / f(0, 0), abs=0.005)
    assert "ours/theirs" not in proc.stdout


@pytest.mark.parametrize("script, message", [
    # Starts like their worker, then fails on the first step request.
    ('read line\necho "their traceback" >&2\nexit 3\n',
     "the authors' side stopped during a latent step (exit code 3)"),
    # Answers something else and waits for more: it is stopped, not waited for.
    ("read line\necho oops\nread line\n",
     "the authors' side answered a latent step with 'oops', not its seconds"),
], ids=["dies", "answers-garbage"])
def test_a_failing_reference_side_is_one_clear_error(tmp_path, script, message):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ready attention=sdpa torch=fake"\n' + script)
    fake.chmod(0o755)
    modeling = tmp_path / "modeling_gpt_neox.py"
    modeling.write_text("")
    argv = ["--authors-modeling-file", str(modeling), "--reference-python", str(fake), "--num-layers", "1",
            "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8", "--micro-batch-size", "1",
            "--rounds", "1", "--threads", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_reference.py"), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.rstrip().endswith(message)
    assert "Traceback (most recent call last)" not in proc.stderr
