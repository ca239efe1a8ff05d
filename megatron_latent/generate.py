"""Generate from a checkpoint with the KV-cached decoder (any method: latent or interpolated
thoughts, pause tokens, extra loops, vanilla; --prefill matters only with thoughts).

    python -m megatron_latent.generate --load CKPT (--prompt TEXT | --prompt-ids 1,2,3) \
        --max-new-tokens 32 [--temperature 0.8 --top-p 0.95 --top-k 50 --seed 1] \
        [--prefill exact|jacobi|tolerance] [--jacobi-iters-eval J] [--jacobi-tol 1e-4] \
        [--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json] [--iteration K]

Decoding is greedy (argmax) unless a sampling flag is given. Reads `CKPT/model_config.json` and
the weights (a checkpoint saved at any TP/PP), runs as one process, and ends its output with one JSON line:
`{"prompt_ids": [...], "ids": [new tokens], "text": detokenized new tokens or null, ...}`.
"""

from __future__ import annotations

import argparse
import json
import sys

# The generation library's argument names whose flag is spelled differently (see cli.flag_message).
_RENAMED = {"mode": "--prefill", "jacobi_iters": "--jacobi-iters-eval", "tol": "--jacobi-tol",
            "temperature": "--temperature"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="KV-cached latent-thought generation from a checkpoint")
    p.add_argument("--load", required=True, help="checkpoint directory (with model_config.json)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: latest)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer-type/--tokenizer-model)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, required=True)
    # Without any of the four sampling flags decoding is greedy (argmax).
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--prefill", choices=("exact", "jacobi", "tolerance"), default="jacobi",
                   help="how the prompt's thoughts are found (default: Jacobi at the model's evaluation J)")
    p.add_argument("--jacobi-iters-eval", type=int, default=None,
                   help="Jacobi passes of --prefill jacobi (default: the model config's)")
    p.add_argument("--jacobi-tol", type=float, default=1e-4, help="tolerance of --prefill tolerance")
    p.add_argument("--stop-at-eod", action="store_true", help="stop at the tokenizer's EOD (or --eod-id)")
    p.add_argument("--eod-id", type=int, default=None)
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    sampling = [f for f in ("temperature", "top_k", "top_p", "seed") if getattr(args, f) is not None]
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature {args.temperature}: must be > 0 (leave out the sampling flags for greedy decoding)")
    if args.jacobi_iters_eval is not None and args.prefill != "jacobi":
        p.error("--jacobi-iters-eval needs --prefill jacobi")
    if args.prompt is not None and args.tokenizer_type is None:
        p.error("--prompt needs --tokenizer-type (and its files); or pass --prompt-ids")
    return args, bool(sampling)


def _prompt_ids(text: str):
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def main(argv=None) -> int:
    args, sampling_given = parse_args(argv)
    # Imported after the flags are read: a mistyped flag fails at once, before megatron loads.
    from megatron_latent.cli import flag_message
    from megatron_latent.config import ConfigError
    from megatron_latent.data.tokenizer import TokenizerError, build_tokenizer
    from megatron_latent.inference import PrefillParams, SamplingParams, generate
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.training.arguments import LIBRARY_FLAGS

    try:
        prefill = PrefillParams(args.prefill, jacobi_iters=args.jacobi_iters_eval,
                                tol=args.jacobi_tol if args.prefill == "tolerance" else None)
        tokenizer = None
        if args.tokenizer_type is not None:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
        prompt = tokenizer.tokenize(args.prompt) if args.prompt is not None else _prompt_ids(args.prompt_ids)
        eod = args.eod_id
        if args.stop_at_eod and eod is None:
            if tokenizer is None:
                raise ValueError("--stop-at-eod needs a tokenizer or --eod-id")
            eod = tokenizer.eod
        model, cfg, iteration = load_model_for_inference(args.load, args.iteration)
        sampling = SamplingParams(
            greedy=not sampling_given,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed,
            vocab_size=cfg.vocab_size,
        )
        out = generate(model, [prompt], args.max_new_tokens, sampling=sampling, prefill=prefill, eod_id=eod)
    except (ConfigError, TokenizerError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {flag_message(e, build_parser(), {**LIBRARY_FLAGS, **_RENAMED})}", file=sys.stderr)
        return 2
    ids = out.ids[0]
    record = {
        "prompt_ids": out.prompt_ids[0],
        "ids": ids,
        "text": tokenizer.detokenize(ids) if tokenizer is not None else None,
        "iteration": iteration,
        "method": cfg.latent.method,
        "num_latent_thoughts": cfg.latent.num_latent_thoughts,
        "prefill": args.prefill,
        "prefill_iters": out.prefill_iters,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":  # guard: megatron's checkpoint machinery may start spawn processes
    sys.exit(main())
