"""What recording the passes' signals (models/pass_stats.py) costs a training forward+backward:
steps with and without it, alternating, in one process; prints the medians and the overhead.

    python benchmarks/bench_thought_stats.py [--num-layers 4 --hidden-size 64 --seq-length 128 --micro-batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_shape import add_shape_flags, shape_config  # benchmarks/, beside this script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_flags(p, arch="llama", hidden_size=64, seq_length=128, micro_batch_size=8)
    p.add_argument("--num-latent-thoughts", type=int, default=1)
    p.add_argument("--jacobi-iters", type=int, default=3)
    p.add_argument("--thought-input", choices=("hidden", "interpolated"), default="hidden")
    p.add_argument("--iters", type=int, default=10, help="pairs of steps timed (after 2 warm-up pairs)")
    args = p.parse_args()

    import torch

    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.models.pass_stats import PassStats
    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.initialize import initialize_single_process
    from megatron_latent.platform import device

    torch.set_num_threads(args.threads)
    initialize_single_process("bench_thought_stats")
    cfg = shape_config(args).replace(num_latent_thoughts=args.num_latent_thoughts, scale_embeddings=True,
                                     thought_input=args.thought_input)
    m = build_gpt_model(cfg, config=to_transformer_config(cfg), model_cls=LatentGPTModel,
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
