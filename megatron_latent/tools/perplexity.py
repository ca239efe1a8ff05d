"""Perplexity of an exported (or any GPT-2 / GPT-NeoX / LLaMA) Hugging Face folder.

    python tools/perplexity.py --hf-dir hf/ --text-file book.txt [--seq-length 1024]
    python tools/perplexity.py --hf-dir hf/ --data-path data/pile_text_document --max-tokens 1000000

Latent models: --latent-prefill jacobi|exact|tolerance and --num-jacobi-iterations choose how the
thoughts are computed (default: the folder's config). Prints tokens, mean nll (nats) and ppl.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 text, tokenized with the folder's tokenizer")
    src.add_argument("--data-path", help="megatron indexed dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: the model's context, <= 2048)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--latent-prefill", choices=["jacobi", "exact", "tolerance"], default=None)
    p.add_argument("--num-jacobi-iterations", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch
    import transformers

    from megatron_latent.hf.perplexity import dataset_tokens, perplexity, windows

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        return fail(f"--hf-dir {args.hf_dir}: no config.json there")
    if args.text_file and not os.path.isfile(args.text_file):
        return fail(f"--text-file {args.text_file}: no such file")
    if args.data_path and not os.path.isfile(args.data_path + ".idx"):
        return fail(f"--data-path {args.data_path}: no {args.data_path}.idx")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf_dir, trust_remote_code=True, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    latent = hasattr(model.config, "num_latent_thoughts")
    if not latent and (args.latent_prefill or args.num_jacobi_iterations is not None):
        return fail(f"--latent-prefill/--num-jacobi-iterations: {args.hf_dir} is not a latent model")
    if args.text_file:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(args.hf_dir, trust_remote_code=True)
        except Exception as e:  # noqa: BLE001
            return fail(f"--hf-dir {args.hf_dir}: no tokenizer to read --text-file ({e.__class__.__name__})")
        with open(args.text_file, encoding="utf-8") as f:
            stream = tok(f.read())["input_ids"]
        stream = stream[: args.max_tokens] if args.max_tokens else stream
    else:
        stream = dataset_tokens(args.data_path, args.max_tokens)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    seq = args.seq_length or min(context, 2048)
    kw = {}
    if args.latent_prefill:
        kw["latent_prefill"] = args.latent_prefill
    if args.num_jacobi_iterations is not None:
        kw["num_jacobi_iterations"] = args.num_jacobi_iterations
    try:
        r = perplexity(model, windows(stream, seq), args.batch_size, progress=not args.no_progress, **kw)
    except ValueError as e:
        from megatron_latent.training.arguments import flag_error

        return fail(flag_error(e, p))
    print(f"tokens {r['tokens']}  nll {r['nll']:.6f}  ppl {r['ppl']:.4f}")
    return 0


def _cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
