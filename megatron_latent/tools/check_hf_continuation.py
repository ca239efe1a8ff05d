"""Check a Hugging Face export against megatron's generation: greedy continuation of the same prompt.

    python -m megatron_latent.generate --load CKPT --prompt-ids 1,2,3 --max-new-tokens K | tail -1 > gen.json
    python tools/check_hf_continuation.py --hf-dir HF --megatron-json gen.json [--tokenizer-model tokenizer.json]

Prints both continuations (ids, and text with the tokenizer); exit status 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="folder written by tools/convert_to_hf.py")
    p.add_argument("--megatron-json", required=True, help="the JSON line printed by megatron_latent.generate")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer.json to show the texts")
    args = p.parse_args(argv)
    try:
        with open(args.megatron_json) as f:
            gen = json.loads(f.read().strip().splitlines()[-1])
        prompt, megatron_ids = [int(i) for i in gen["prompt_ids"]], [int(i) for i in gen["ids"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        print(f"error: --megatron-json {args.megatron_json}: not the JSON line of megatron_latent.generate ({e})",
              file=sys.stderr)
        return 2

    from megatron_latent.analysis.continuation import hf_greedy_ids

    hf_ids = hf_greedy_ids(args.hf_dir, prompt, len(megatron_ids))
    decode = None
    if args.tokenizer_model:
        from tokenizers import Tokenizer

        decode = Tokenizer.from_file(args.tokenizer_model).decode
        print(f"prompt:                {decode(prompt)!r}")
    for name, ids in (("megatron_latent.generate", megatron_ids), ("Hugging Face export", hf_ids)):
        print(f"{name:<25}{ids}" + (f"\n{'':<25}{decode(ids)!r}" if decode else ""))
    if hf_ids != megatron_ids:
        first = next(i for i, (a, b) in enumerate(zip(hf_ids + [None], megatron_ids + [None])) if a != b)
        print(f"error: the continuations differ from new token {first} on", file=sys.stderr)
        return 1
    print(f"the continuations agree ({len(hf_ids)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
