"""Validation loss of a latent checkpoint against the evaluation J, and with the exact sequential
rollout: how many Jacobi passes inference needs (megatron_latent/inference/jacobi_eval.py).

    python benchmarks/eval_jacobi.py --load ckpt/ --data-path data/valid_text_document \
        [--jacobi 0 1 2 3 4 5 6] [--num-windows 128] [--tokens-per-byte 0.31] [--json out.json]

Windows of the model's sequence length are taken at evenly spaced offsets of the dataset's
documents laid back to back. Prints one line per setting: loss (nats/token), and bits per byte
when --tokens-per-byte (tokens of the text per UTF-8 byte) is given.
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
    p.add_argument("--no-rollout", action="store_true", help="skip the exact sequential rollout (slow)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--num-windows", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens-per-byte", type=float, default=None)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.jacobi) < 0:
        p.error(f"--jacobi values must be >= 0, got {args.jacobi}")

    from megatron_latent.checkpoint_layout import resolve_iteration
    from megatron_latent.hf.perplexity import dataset_tokens
    from megatron_latent.inference.jacobi_eval import bits_per_byte, jacobi_losses, spread_windows
    from megatron_latent.inference.loading import load_model_for_inference

    for suffix in (".bin", ".idx"):
        if not os.path.exists(args.data_path + suffix):
            sys.exit(f"error: --data-path: {args.data_path}{suffix} does not exist")
    try:
        resolve_iteration(args.load, args.iteration)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    model, cfg, iteration = load_model_for_inference(args.load, args.iteration)
    seq = args.seq_length or cfg.seq_length
    try:
        windows = spread_windows(dataset_tokens(args.data_path), seq, args.num_windows)
    except ValueError as err:
        sys.exit(f"error: --data-path {args.data_path}: {err}")
    losses = jacobi_losses(model, windows, args.jacobi, rollout=not args.no_rollout, batch_size=args.batch_size)
    result = {
        "load": args.load, "iteration": iteration, "data_path": args.data_path, "seq_length": seq,
        "windows": args.num_windows, "tokens": args.num_windows * seq,
        "num_latent_thoughts": cfg.latent.num_latent_thoughts,
        "loss": {str(k): v for k, v in losses.items()},
        "bpb": {str(k): bits_per_byte(v, args.tokens_per_byte) for k, v in losses.items()},
    }
    print(f"{args.load} iteration {iteration}, N={cfg.latent.num_latent_thoughts}: {result['tokens']:,} tokens "
          f"({args.num_windows} windows of {seq})")
    for k, v in losses.items():
        bpb = result["bpb"][str(k)]
        name = "exact rollout" if isinstance(k, str) else f"J={k}"
        print(f"{name:>14}: loss {v:.5f}" + ("" if bpb is None else f", {bpb:.4f} bits/byte"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
