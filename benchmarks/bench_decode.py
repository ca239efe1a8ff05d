"""Decode speed of an exported-style latent model (N=1) against its N=0 twin of the same size and an
N=0 model with twice the non-embedding parameters (2x layers): the paper's equal-inference-cost
comparison. Random weights (speed does not depend on them), HF transformers forward with a KV cache.

    python benchmarks/bench_decode.py --model-preset pythia-70m --batch-sizes 1 8 --prefill 512 --decode 32

Per model and batch size: prefill time, decode tokens/s (batch x new tokens / time), median
per-token latency, and KV-cache bytes per token (measured from the cache; (N+1) x layers x 2 x
kv heads x head dim x dtype bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(cfg, dtype):
    import torch
    import transformers

    from megatron_latent.hf import modeling_latent as ml
    from megatron_latent.hf.export import _LATENT_CLASSES, _LATENT_CONFIGS, hf_config_dict, is_latent

    d = hf_config_dict(cfg)
    if is_latent(cfg):
        conf = getattr(ml, _LATENT_CONFIGS[cfg.arch]).from_dict(d)
        cls = getattr(ml, _LATENT_CLASSES[cfg.arch])
    else:
        conf = transformers.CONFIG_MAPPING[d["model_type"]].from_dict(d)
        cls = getattr(transformers, d["architectures"][0])
    torch.manual_seed(0)
    return cls(conf).to(dtype).eval()


def cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def bench(model, batch, prefill, decode, vocab):
    import torch

    ids = torch.randint(0, vocab, (batch, prefill), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        t_prefill = time.perf_counter() - t0
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        lat = []
        for _ in range(decode):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            t = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True,
                        **{"cache" if hasattr(out, "cache") else "past_key_values": cache})
            lat.append(time.perf_counter() - t)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = prefill + decode
    return {"prefill_s": t_prefill, "tok_s": batch * decode / sum(lat), "latency_ms": 1000 * statistics.median(lat),
            "kv_bytes_per_token": cache_bytes(cache) / (batch * tokens)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-preset", default="pythia-70m")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from megatron_latent.config import get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    base = get_preset(args.model_preset)
    models = [
        ("N=1 (latent)", base.replace(num_latent_thoughts=1, scale_embeddings=True)),
        ("N=0 twin", base),
        ("N=0 2x layers", base.replace(num_layers=2 * base.num_layers)),
    ]
    dtype = getattr(torch, args.dtype)
    print(f"preset {args.model_preset}, prefill {args.prefill}, decode {args.decode}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, device cpu")
    print(f"{'model':15s} {'non-emb params':>14s} {'batch':>5s} {'prefill s':>9s} {'decode tok/s':>12s} "
          f"{'ms/token':>9s} {'KV B/token':>10s}")
    for name, cfg in models:
        model = build(cfg, dtype)
        bench(model, 1, 8, 2, cfg.vocab_size)  # warm-up
        for b in args.batch_sizes:
            r = bench(model, b, args.prefill, args.decode, cfg.vocab_size)
            print(f"{name:15s} {cfg.num_parameters(include_embeddings=False):14,d} {b:5d} {r['prefill_s']:9.2f} "
                  f"{r['tok_s']:12.1f} {r['latency_ms']:9.2f} {r['kv_bytes_per_token']:10,.0f}", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
