"""Time forward+backward of a vanilla GPT (N=0) and latent models (N=1, J=2 and J=3) of the same
size, and print measured step-time ratios beside the exact FLOP ratios.

    python benchmarks/bench_latent.py [--num-layers 4 --hidden-size 256 --vocab-size 2048 --seq-length 256]
"""

from __future__ import annotations

import argparse
import time

from bench_shape import add_shape_flags, shape_config  # benchmarks/, beside this script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_flags(p)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (GPU)")
    args = p.parse_args()

    import torch

    from megatron_latent.models.flops import model_step_flops
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.initialize import initialize_single_process
    from megatron_latent.platform import device

    torch.set_num_threads(args.threads)
    initialize_single_process("bench_latent")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base = shape_config(args)
    L, b = args.seq_length, args.micro_batch_size
    tokens = torch.randint(0, args.vocab_size, (b, L), device=device())
    pos = torch.arange(L, device=device()).expand(b, L)

    def step_time(n, j):
        cfg = base.replace(num_latent_thoughts=n, scale_embeddings=bool(n))
        m = build_gpt_model(cfg, config=to_transformer_config(cfg, params_dtype=dtype), model_cls=LatentGPTModel,
                            latent=cfg.latent).to(device())
        m.train()
        times = []
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            m(tokens, pos, None, labels=tokens, num_jacobi_iters=j if n else None).mean().backward()
            if device().type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first iteration warms up
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def flops(n, j):
        return model_step_flops(base.replace(num_latent_thoughts=n), L, j)

    base_t, base_f = step_time(0, 0), flops(0, 0)
    print(f"model: {args.arch}, {args.num_layers} layers, H={args.hidden_size}, V={args.vocab_size}, L={L}, "
          f"micro-batch {b}, {args.threads} threads, {device()}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'config':<12}{'step (s)':>10}{'time ratio':>12}{'FLOP ratio':>12}{'time/FLOP':>11}")
    print(f"{'N=0':<12}{base_t:>10.3f}{1.0:>12.2f}{1.0:>12.2f}{1.0:>11.2f}")
    for j in (2, 3):
        t, f = step_time(1, j), flops(1, j)
        print(f"{f'N=1 J={j}':<12}{t:>10.3f}{t / base_t:>12.2f}{f / base_f:>12.2f}{(t / base_t) / (f / base_f):>11.2f}")


if __name__ == "__main__":
    main()
