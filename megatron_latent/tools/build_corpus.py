"""Build the offline quickstart corpus: the installed Python standard library's docstrings and
sources as Pile-style JSONL; optionally train a byte-level BPE tokenizer on it (or on --input).

    python tools/build_corpus.py --output corpus.jsonl [--max-mb 4]
    python tools/build_corpus.py --input my.jsonl --tokenizer-output tokenizer.json --vocab-size 2048
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="JSONL corpus to write from the standard library")
    p.add_argument("--max-mb", type=float, default=None, help="keep at most this many MiB of text")
    p.add_argument("--seed", type=int, default=1234, help="document order")
    p.add_argument("--input", nargs="+", default=None, help="train the tokenizer on this corpus instead")
    p.add_argument("--tokenizer-output", default=None, help="tokenizer.json to train and write")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args(argv)
    if not args.output and not args.tokenizer_output:
        p.error("nothing to do: give --output and/or --tokenizer-output")
    if args.vocab_size < 257:
        p.error(f"--vocab-size {args.vocab_size}: a byte-level BPE needs at least 257 (256 bytes + <|endoftext|>)")

    from megatron_latent.data.corpus import InputError
    from megatron_latent.data.pycorpus import stdlib_root, train_bpe_tokenizer, write_stdlib_corpus

    try:
        if args.output:
            max_bytes = int(args.max_mb * (1 << 20)) if args.max_mb else None
            s = write_stdlib_corpus(args.output, max_bytes=max_bytes, seed=args.seed)
            print(f"wrote {args.output}: {s['documents']} documents ({s['docstring_documents']} of docstrings), "
                  f"{s['bytes'] / (1 << 20):.1f} MiB of text from {stdlib_root()}")
        if args.tokenizer_output:
            inputs = args.input or [args.output]
            if inputs == [None]:
                p.error("--tokenizer-output needs --input or --output")
            size, eod = train_bpe_tokenizer(inputs, args.tokenizer_output, args.vocab_size)
            print(f"wrote {args.tokenizer_output}: byte-level BPE, {size} tokens, end of document {eod}")
    except (OSError, ValueError, InputError) as e:
        from megatron_latent.training.arguments import flag_error

        print(f"error: {flag_error(e, p)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
