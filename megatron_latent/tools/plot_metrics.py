"""Plot training curves of one or more runs into a PNG (e.g. latent vs vanilla).

    python tools/plot_metrics.py --run vanilla=ckpt/n0/logs/metrics.jsonl --run latent=ckpt/n1/logs/metrics.jsonl \
        --keys train/loss valid/loss --output curves.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_latent.training.metrics import read_metrics  # noqa: E402


def plot_metrics(runs: Dict[str, str], out_png: str, keys=("train/loss", "valid/loss"),
                 tokens_per_step: Optional[Dict[str, int]] = None) -> None:
    """One PNG with a panel per key, a curve per run ({label: metrics.jsonl}). With
    `tokens_per_step` the x axis is tokens seen instead of iterations. Written atomically."""
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, path in runs.items():
            steps, values = read_metrics(path, key)
            x = [s * tokens_per_step[label] for s in steps] if tokens_per_step else steps
            ax.plot(x, values, label=label, marker="o" if len(x) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("tokens" if tokens_per_step else "iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL")
    p.add_argument("--keys", nargs="+", default=["train/loss", "valid/loss"])
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
