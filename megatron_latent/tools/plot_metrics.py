"""Plot training curves of one or more runs into a PNG (e.g. latent vs vanilla): the loss next to
the validation loss at other J, the Jacobi residuals and the downstream accuracies.

    python tools/plot_metrics.py --run vanilla=ckpt/n0/logs/metrics.jsonl --run latent=ckpt/n1/logs/metrics.jsonl \
        --output curves.png [--keys train/loss valid/loss 'thoughts/jacobi_residual_*' ...]

A key with a wildcard (`*`, `?`, `[...]`) is a panel of every matching key (a curve per run and
key), left out when no run has one; a plain key must be in every run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_latent.analysis.figures import save_png  # noqa: E402
from megatron_latent.training.metrics import metric_keys, read_metrics  # noqa: E402

DEFAULT_PANELS = ("train/loss", "valid/loss", "valid/loss_J*", "thoughts/jacobi_residual_*", "loops/change_*",
                  "downstream/*/acc")
# Residuals and changes span decades as the passes converge.
LOG_SCALE = ("thoughts/jacobi_residual_", "loops/change_")


def _panels(runs: Dict[str, str], keys):
    """[(title, [(curve label, run, key)])]: wildcard panels that match nothing are left out."""
    panels = []
    for pattern in keys:
        if not any(c in pattern for c in "*?["):
            panels.append((pattern, [(label, label, pattern) for label in runs]))
            continue
        stem = pattern[:min(pattern.index(c) for c in "*?[" if c in pattern)]
        curves = [(f"{label} {key[len(stem):]}" if len(runs) > 1 else key[len(stem):], label, key)
                  for label, path in runs.items() for key in metric_keys(path, pattern)]
        if curves:
            panels.append((pattern, curves))
    return panels


def plot_metrics(runs: Dict[str, str], out_png: str, keys=DEFAULT_PANELS,
                 tokens_per_step: Optional[Dict[str, int]] = None) -> None:
    """One PNG with a panel per key, a curve per run ({label: metrics.jsonl}) and matching key. With
    `tokens_per_step` the x axis is tokens seen instead of iterations. Written atomically."""
    panels = _panels(runs, keys)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes.flat, panels):
        for label, run, key in curves:
            steps, values = read_metrics(runs[run], key)
            x = [s * tokens_per_step[run] for s in steps] if tokens_per_step else steps
            ax.plot(x, values, label=label, marker="o" if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("tokens" if tokens_per_step else "iteration")
        if title.startswith(LOG_SCALE):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, out_png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL")
    p.add_argument("--keys", nargs="+", default=list(DEFAULT_PANELS),
                   help="one panel each; wildcards allowed (default: %(default)s)")
    p.add_argument("--output", required=True, help="PNG path")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            p.error(f"--run {spec!r}: expected LABEL=PATH")
        runs[label] = path
    try:
        plot_metrics(runs, args.output, tuple(args.keys))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
