"""Compare finished runs: one table and one PNG of validation loss against training tokens.

    python tools/compare_runs.py RUN_DIR [RUN_DIR ...] [--label NAME ...] [--plot curves.png] \
        [--latent LABEL --baselines LABEL ...]

A RUN_DIR holds its checkpoint (model_config.json, iter_*) and metrics.jsonl, directly or in ckpt/
and logs/. Runs that differ only in --seed are grouped (mean ± std) unless --no-group-seeds.
Training FLOPs are exact (each step at the J it drew); inference FLOPs per token are those of
KV-cached decoding averaged over one training-length sequence (megatron_latent/analysis/compare.py).
Runs that evaluated downstream tasks during training (--eval-tasks) get a column per task: its
newest accuracy.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--label", nargs="+", default=None, help="one name per RUN_DIR (default: the folder names)")
    p.add_argument("--plot", default=None, help="PNG of validation loss against training tokens")
    p.add_argument("--no-group-seeds", action="store_true", help="one row per run even when only seeds differ")
    p.add_argument("--latent", default=None, help="label of the run to judge against --baselines")
    p.add_argument("--baselines", nargs="+", default=[])
    args = p.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        p.error(f"--label: {len(args.label)} names for {len(args.runs)} run directories")
    labels = args.label or [None] * len(args.runs)

    from megatron_latent.analysis.compare import format_table, plot_valid_loss, summarize_run, verdict

    try:
        runs = [summarize_run(d, label) for d, label in zip(args.runs, labels)]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    known = {r.label for r in runs}
    for name in ([args.latent] if args.latent else []) + args.baselines:
        if name not in known:
            p.error(f"--latent/--baselines: no run labelled {name!r} (labels: {', '.join(sorted(known))})")
    print(format_table(runs, group_seeds=not args.no_group_seeds))
    if args.latent and args.baselines:
        print(verdict(runs, args.latent, args.baselines))
    if args.plot:
        plot_valid_loss(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
