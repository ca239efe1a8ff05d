"""What recording the passes' signals (models/pass_stats.py) costs a training forward+backward:
steps with and without it, alternating, in one process; prints the medians and the overhead.

    python benchmarks/bench_thought_stats.py [--num-layers 4 --hidden-size 64 --seq-length 128 --micro-batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("gpt2", "gpt-neox", "llama"), default="llama")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-latent-thoughts", type=int, default=1)
    p.add_argument("--jacobi-iters", type=int, default=3)
    p.add_argument("--thought-input", choices=("hidden", "interpolated"), default="hidden")
    p.add_argument("--iters", type=int, default=10, help="pairs of steps timed (after 2 warm-up pairs)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    from megatron_latent.config import ModelConfig
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.models.pass_stats import PassStats
    from megatron_latent.parallel.initialize import initialize_single_process
    from megatron_latent.platform import device

    torch.set_num_threads(args.threads)
    initialize_single_process("bench_thought_stats")
    cfg = ModelConfig(
        name="bench", arch=args.arch, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
        vocab_size=args.vocab_size, seq_length=args.seq_length,
    ).replace(num_latent_thoughts=args.num_latent_thoughts, scale_embeddings=True, thought_input=args.thought_input)
    m = build_gpt_model(cfg, config=cfg.to_transformer_config(), model_cls=LatentGPTModel,
                        latent=cfg.latent).to(device())
    m.train()
    L, b = args.seq_length, args.micro_batch_size
    tokens = torch.randint(0, args.vocab_size, (b, L), device=device())
    pos = torch.arange(L, device=device()).expand(b, L)

    times = {False: [], True: []}
    for i in range(args.iters + 2):
        for on in (False, True):
            m.pass_stats = PassStats() if on else None
            t0 = time.perf_counter()
            m(tokens, pos, None, labels=tokens, num_jacobi_iters=args.jacobi_iters).mean().backward()
            if on:
                PassStats.reduce([m.pass_stats])
            if device().type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[on].append(time.perf_counter() - t0)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{cfg.latent.label} J={args.jacobi_iters}, {args.arch} {args.num_layers} layers, H={args.hidden_size}, "
          f"L={L}, micro-batch {b}, {args.threads} threads, {device()}")
    print(f"median step without {1e3 * off:.1f} ms, with the signals {1e3 * on:.1f} ms: {100 * (on - off) / off:+.1f}%")


if __name__ == "__main__":
    main()
