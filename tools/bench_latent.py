"""Time forward+backward of a vanilla GPT (N=0) and latent models (N=1, J=2 and J=3) of the same
size, and print measured step-time ratios beside the exact FLOP ratios.

    python tools/bench_latent.py [--num-layers 4 --hidden-size 256 --vocab-size 2048 --seq-length 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (GPU)")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    import megatron_latent  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_latent.models.flops import latent_step_flops
    from megatron_latent.models.latent import LatentGPTModel, LatentSettings
    from megatron_latent.models.norms import with_torch_norms
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.platform import device

    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo" if device().type == "cpu" else "nccl",
            init_method=f"file://{tempfile.mkdtemp()}/rdzv", rank=0, world_size=1,
        )
    initialize_model_parallel(1, 1)
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16,
    )
    spec = with_torch_norms(get_gpt_layer_local_spec(), args.num_layers)
    L, b = args.seq_length, args.micro_batch_size
    tokens = torch.randint(0, args.vocab_size, (b, L), device=device())
    pos = torch.arange(L, device=device()).expand(b, L)

    def step_time(n, j):
        latent = LatentSettings(n, scale_embeddings=True) if n else LatentSettings()
        m = LatentGPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                           max_sequence_length=L, position_embedding_type="rope", latent=latent).to(device())
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
        return latent_step_flops(L, n, j, args.vocab_size, args.hidden_size, args.num_layers,
                                 cfg.ffn_hidden_size, args.num_attention_heads)

    base_t, base_f = step_time(0, 0), flops(0, 0)
    print(f"model: {args.num_layers} layers, H={args.hidden_size}, V={args.vocab_size}, L={L}, "
          f"micro-batch {b}, {args.threads} threads, {device()}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'config':<12}{'step (s)':>10}{'time ratio':>12}{'FLOP ratio':>12}{'time/FLOP':>11}")
    print(f"{'N=0':<12}{base_t:>10.3f}{1.0:>12.2f}{1.0:>12.2f}{1.0:>11.2f}")
    for j in (2, 3):
        t, f = step_time(1, j), flops(1, j)
        print(f"{f'N=1 J={j}':<12}{t:>10.3f}{t / base_t:>12.2f}{f / base_f:>12.2f}{(t / base_t) / (f / base_f):>11.2f}")


if __name__ == "__main__":
    main()
