"""Command-line flags, named as Megatron-LM names them (plus this project's own)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_latent.pretrain",
        description="Pretrain a GPT (optionally with latent thoughts) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--vocab-size", type=int, default=128, help="vocabulary size (mock data)")
    g = p.add_argument_group("latent thoughts")
    g.add_argument("--num-latent-thoughts", type=int, default=0, help="N thoughts per token (0 = vanilla GPT)")
    g.add_argument("--jacobi-iters", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="inclusive range J is drawn from per training step (default 2 3 when N > 0)")
    g.add_argument("--jacobi-iters-eval", type=int, default=3)
    g.add_argument("--scale-embeddings", action="store_true", help="scale token embeddings by sqrt(2.5 H)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=1)
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="synthetic, learnable token stream")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.mock_data:
        parser.error("--mock-data is the only data source so far")
    if args.num_latent_thoughts > 0 and args.pipeline_model_parallel_size > 1:
        parser.error("--num-latent-thoughts > 0 with --pipeline-model-parallel-size > 1 needs the "
                     "pass <-> pipeline-chunk wiring, which is not implemented yet")
    return args
