"""Cheaper latent training, measured: step time and peak activation memory of one forward+backward
for --jacobi-grad-passes K = 1, 2 and all, at N = 1 and 2, J = 2 and 3, beside the exact FLOP
ratio to a vanilla step; and the same with megatron's full recompute (--recompute-granularity full
--recompute-method uniform), once per pass (--recompute-num-layers <layers>: every pass rerun from
its input in backward) and once per layer (--recompute-num-layers 1, megatron's default: every
layer of every pass rerun from its own input).

    python benchmarks/bench_grad_passes.py [--arch gpt-neox --num-layers 4 --hidden-size 128 --seq-length 128]

Activation memory is the peak of what autograd saves for backward over the forward and the
backward (benchmarks/activation_memory.py; recompute saves a unit's activations again in backward), so
it reads the same on any device.
"""

from __future__ import annotations

import argparse
import time

from bench_shape import add_shape_flags, shape_config  # benchmarks/, beside this script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_flags(p, hidden_size=128, vocab_size=256, seq_length=128, micro_batch_size=8)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    # Imported after the flags: --help answers at once.
    import torch
    from activation_memory import SavedActivationMeter  # benchmarks/, beside this script

    from megatron_latent.models.flops import model_step_flops
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.initialize import initialize_single_process
    from megatron_latent.platform import device

    torch.set_num_threads(args.threads)
    initialize_single_process("bench_grad_passes")
    base = shape_config(args)
    L, b = args.seq_length, args.micro_batch_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (b, L + 1), generator=g).to(device())
    pos = torch.arange(L, device=device()).expand(b, L)
    def recompute(layers):
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=layers)

    def measure(n, j, k, overrides):
        cfg = base.replace(num_latent_thoughts=n, grad_passes=k)
        torch.manual_seed(0)
        m = build_gpt_model(cfg, config=to_transformer_config(cfg, **overrides), model_cls=LatentGPTModel,
                            latent=cfg.latent).to(device()).train()

        def step():
            loss = m(tokens[:, :-1], pos, None, labels=tokens[:, 1:], num_jacobi_iters=j if n else None).mean()
            loss.backward()

        # The first step warms up and is metered, over backward too: recompute saves a unit's
        # activations again there. The timed steps run without the meter's hooks.
        with SavedActivationMeter(m.parameters()) as meter:
            step()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            if device().type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = meter.peak_bytes
        flops = model_step_flops(cfg, L, j)
        return sorted(times)[len(times) // 2], peak, flops

    t0, m0, f0 = measure(0, 0, None, {})
    print(f"model: {args.arch}, {args.num_layers} layers, H={args.hidden_size}, V={args.vocab_size}, L={L}, "
          f"micro-batch {b}, {args.threads} threads, {device()}, fp32")
    print(f"vanilla step {t0:.3f} s, activations {m0 / 2**20:.1f} MiB")
    print(f"{'N':>2} {'J':>2} {'passes':>6} {'K':>4} {'recompute':>9} | {'step (s)':>8} {'time ratio':>10} "
          f"{'FLOP ratio':>10} | {'act. MiB':>8} {'vs vanilla':>10}")
    for n in (1, 2):
        for j in (2, 3):
            passes = n + j + 1
            for k in (1, 2, None):
                for name, overrides in (("-", {}), ("pass", recompute(args.num_layers)), ("layer", recompute(1))):
                    t, mem, f = measure(n, j, k, overrides)
                    print(f"{n:>2} {j:>2} {passes:>6} {k or 'all':>4} {name:>9} | {t:>8.3f} {t / t0:>10.2f} "
                          f"{f / f0:>10.2f} | {mem / 2**20:>8.1f} {mem / m0:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
