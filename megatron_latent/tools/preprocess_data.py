"""Tokenize a JSONL / JSONL.zst / JSONL.gz / TXT corpus into megatron indexed datasets.

Example (Pile shard, Pythia tokenizer):
    python tools/preprocess_data.py --input pile/00.jsonl.zst --json-keys text \
        --output-prefix data/pile00 --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model gpt-neox-20b-tokenizer.json --append-eod --workers 8
writes data/pile00_text_document.bin/.idx. See docs/data.md.
"""

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from megatron_latent.data.tokenizer import TOKENIZER_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories (.jsonl, .json, .txt, optionally .zst/.gz)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad line instead of skipping and counting it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="tokenizer.json (or its folder) / sentencepiece .model")
    g.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    g.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    g.add_argument("--eod-token", help="end-of-document token (default: taken from the tokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer threads in all (default 1)")
    g.add_argument("--partitions", type=int, default=1,
                   help="split the input into N pieces, processed by separate processes and merged")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.workers < 1 or args.partitions < 1:
        sys.exit("error: --workers and --partitions must be >= 1")
    # The native tokenizer pools read their size once, at first use: set it before anything runs.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.workers // args.partitions)))
    from megatron_latent.data.corpus import InputError
    from megatron_latent.data.preprocess import PreprocessConfig, PreprocessError, format_summary, preprocess
    from megatron_latent.data.tokenizer import TokenizerError, build_tokenizer

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                    args.merge_file, args.eod_token)
        print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
        config = PreprocessConfig(
            inputs=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
            append_eod=args.append_eod, workers=args.workers, partitions=args.partitions,
            strict=args.strict, log_interval=args.log_interval, progress=not args.no_progress)
        stats = preprocess(config, tokenizer)
    except (InputError, TokenizerError, PreprocessError) as err:
        from megatron_latent.training.arguments import flag_error

        sys.exit(f"error: {flag_error(err, build_parser())}")
    print(format_summary(stats, tokenizer), file=sys.stderr)


if __name__ == "__main__":
    main()
