"""The model-shape flags and config shared by the step benchmarks (bench_latent, bench_grad_passes,
bench_thought_stats); each script passes its own defaults."""

from __future__ import annotations

import argparse
import os


def add_shape_flags(p: argparse.ArgumentParser, arch: str = "gpt-neox", hidden_size: int = 256,
                    vocab_size: int = 2048, seq_length: int = 256, micro_batch_size: int = 1) -> None:
    """--arch, --num-layers, --hidden-size, --num-attention-heads, --vocab-size, --seq-length,
    --micro-batch-size and --threads."""
    p.add_argument("--arch", choices=("gpt2", "gpt-neox", "llama"), default=arch)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=hidden_size)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=vocab_size)
    p.add_argument("--seq-length", type=int, default=seq_length)
    p.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    p.add_argument("--threads", type=int, default=os.cpu_count())


def shape_config(args):
    """The ModelConfig of those flags (FFN 4H), vanilla; callers `replace` the method."""
    from megatron_latent.config import ModelConfig

    return ModelConfig(
        name="bench", arch=args.arch, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
        vocab_size=args.vocab_size, seq_length=args.seq_length,
    )
