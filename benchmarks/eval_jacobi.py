"""Validation loss and next-token accuracy of a latent checkpoint against the passes spent: each
evaluation J, each Jacobi tolerance, and the exact sequential rollout. How many Jacobi passes
prefill and scoring need (megatron_latent/inference/jacobi_eval.py).

    python benchmarks/eval_jacobi.py --load ckpt/ --data-path data/valid_text_document \
        [--jacobi 0 1 2 3 4 5 6] [--tolerances 1e-2 1e-3 1e-4] [--num-windows 128] \
        [--tokens-per-byte 0.31] [--json out.json]

Windows of the model's sequence length are taken at evenly spaced offsets of the dataset's
documents laid back to back. Prints one line per setting: loss (nats/token), top-1 accuracy, the
Jacobi passes run (mean per batch; a tolerance stops when no thought moves by more than it), the
forward FLOPs per token (models/flops.py) and bits per byte when --tokens-per-byte (tokens of the
text per UTF-8 byte) is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (as written by --save)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--jacobi", type=int, nargs="+", default=list(range(7)), help="evaluation J values")
    p.add_argument("--tolerances", type=float, nargs="*", default=[], help="Jacobi tolerances (prefill 'tolerance')")
    p.add_argument("--no-rollout", action="store_true", help="skip the exact sequential rollout (slow)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--num-windows", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens-per-byte", type=float, default=None)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.jacobi) < 0:
        p.error(f"--jacobi values must be >= 0, got {args.jacobi}")
    if any(not t > 0 for t in args.tolerances):
        p.error(f"--tolerances must be > 0, got {args.tolerances}")

    from megatron_latent.checkpoint_layout import resolve_iteration
    from megatron_latent.hf.perplexity import dataset_tokens
    from megatron_latent.inference.jacobi_eval import bits_per_byte, jacobi_scores, spread_windows
    from megatron_latent.inference.loading import load_model_for_inference

    for suffix in (".bin", ".idx"):
        if not os.path.exists(args.data_path + suffix):
            sys.exit(f"error: --data-path: {args.data_path}{suffix} does not exist")
    try:
        resolve_iteration(args.load, args.iteration)
    except (FileNotFoundError, ValueError) as err:
        from megatron_latent.training.arguments import flag_error

        sys.exit(f"error: {flag_error(err, p)}")
    model, cfg, iteration = load_model_for_inference(args.load, args.iteration)
    seq = args.seq_length or cfg.seq_length
    try:
        windows = spread_windows(dataset_tokens(args.data_path), seq, args.num_windows)
    except ValueError as err:
        sys.exit(f"error: --data-path {args.data_path}: {err}")
    scores = jacobi_scores(model, cfg, windows, args.jacobi, args.tolerances, rollout=not args.no_rollout,
                           batch_size=args.batch_size)
    losses = {k: v["loss"] for k, v in scores.items()}
    result = {
        "load": args.load, "iteration": iteration, "data_path": args.data_path, "seq_length": seq,
        "windows": args.num_windows, "tokens": args.num_windows * seq,
        "num_latent_thoughts": cfg.latent.num_latent_thoughts,
        "loss": {str(k): v for k, v in losses.items()},
        "bpb": {str(k): bits_per_byte(v, args.tokens_per_byte) for k, v in losses.items()},
        "scores": {str(k): v for k, v in scores.items()},
    }
    print(f"{args.load} iteration {iteration}, N={cfg.latent.num_latent_thoughts}: {result['tokens']:,} tokens "
          f"({args.num_windows} windows of {seq})")
    for k, v in losses.items():
        bpb, sc = result["bpb"][str(k)], scores[k]
        name = "exact rollout" if k == "exact" else k if isinstance(k, str) else f"J={k}"
        passes = "" if sc["jacobi_passes"] is None else f", {sc['jacobi_passes']:.2f} Jacobi passes"
        print(f"{name:>14}: loss {v:.5f}, accuracy {sc['accuracy']:.4f}{passes}, "
              f"{sc['flops_per_token'] / 1e6:.3f} MFLOP/token" + ("" if bpb is None else f", {bpb:.4f} bits/byte"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
