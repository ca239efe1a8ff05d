"""Decode throughput of the KV-cached latent generator (megatron side), and prefill cost per prefill mode.

    python benchmarks/bench_decode_megatron.py [--preset tiny-llama] [--hidden-size 256 --num-layers 4]
        [--prompt-len 64 --new-tokens 64 --batch-size 1] [--thoughts 0,1,2] [--threads 1]

For each N: new tokens per second of greedy decoding after the prompt (prefill excluded), the
ratio to N=0 (about N+1 expected: N+1 cached steps per token), and the time of each
prefill mode with the Jacobi passes it used. Also the uncached sequential reference on the
same prompt, for scale. Random weights (paper init); numbers are per process, fp32.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--thoughts", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    import megatron_latent  # noqa: F401
    from megatron_latent.config import get_preset
    from megatron_latent.inference import PrefillParams, decode_logits, generate
    from megatron_latent.inference.reference import sequential_logits
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(1, 1)  # a world of one (its rendezvous a temporary file)
    h = args.hidden_size
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def best(fn):
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times), out

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.batch_size, args.prompt_len), generator=g).to(device)
    rows, base = [], None
    for n in [int(x) for x in args.thoughts.split(",")]:
        cfg = get_preset(
            args.preset, hidden_size=h, num_layers=args.num_layers, ffn_hidden_size=4 * h,
            num_attention_heads=max(4, h // 64), num_query_groups=None, vocab_size=args.vocab_size,
            seq_length=args.prompt_len + args.new_tokens, num_latent_thoughts=n, scale_embeddings=bool(n),
        )
        model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False)
        model = model.to(device).eval()
        t_prefill_only, _ = best(lambda: generate(model, prompt, 1))
        t_total, out = best(lambda: generate(model, prompt, args.new_tokens + 1))
        tok_s = args.batch_size * args.new_tokens / (t_total - t_prefill_only)
        base = tok_s if n == 0 else base
        row = {"N": n, "decode_tok_s": round(tok_s, 1),
               "slowdown_vs_N0": round(base / tok_s, 2) if base else None, "prefill": {}}
        for params in (PrefillParams("exact"), PrefillParams("jacobi", cfg.latent.jacobi_iters_eval),
                       PrefillParams("tolerance", tol=1e-4)):
            t, res = best(lambda: decode_logits(model, prompt, decode_steps=0, prefill=params))
            row["prefill"][params.mode] = {"s": round(t, 4), "jacobi_passes": res.prefill_iters}
        pos = torch.arange(args.prompt_len, device=device).expand(args.batch_size, -1)
        t_ref, _ = best(lambda: sequential_logits(model, prompt, pos))
        row["uncached_reference_prompt_s"] = round(t_ref, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"config": vars(args), "device": device, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
