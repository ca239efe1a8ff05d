"""Plot training curves of one or more runs into a PNG (e.g. latent vs vanilla).

    python tools/plot_metrics.py --run vanilla=ckpt/n0/logs/metrics.jsonl --run latent=ckpt/n1/logs/metrics.jsonl \
        --keys train/loss valid/loss --output curves.png
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL")
    p.add_argument("--keys", nargs="+", default=["train/loss", "valid/loss"])
    p.add_argument("--output", required=True, help="PNG path")
    args = p.parse_args(argv)
    from megatron_latent.training.metrics import plot_metrics

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
