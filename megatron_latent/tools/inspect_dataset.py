"""Inspect a megatron indexed dataset: counts, decode documents, verify integrity.

    python tools/inspect_dataset.py data/pile00_text_document               # counts
    python tools/inspect_dataset.py PREFIX --decode 0 5 --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model gpt-neox-20b-tokenizer.json                       # print documents 0, 5
    python tools/inspect_dataset.py PREFIX --verify [--vocab-size 50277]    # exit 1 if broken
"""

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--decode", type=int, nargs="*", default=[], metavar="K", help="documents to print")
    p.add_argument("--ids", action="store_true", help="print token ids of decoded documents too")
    p.add_argument("--verify", action="store_true", help="check .bin/.idx integrity")
    p.add_argument("--vocab-size", type=int, help="with --verify: every token id must be below it")
    p.add_argument("--tokenizer-type")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    args = p.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix

    from megatron_latent.data import indexed
    from megatron_latent.data.tokenizer import TokenizerError, build_tokenizer

    tokenizer = None
    if args.tokenizer_type:
        try:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                        args.merge_file)
        except TokenizerError as err:
            from megatron_latent.training.arguments import flag_error

            sys.exit(f"error: {flag_error(err, p)}")
    if args.verify:
        vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer else None)
        errors = indexed.verify(prefix, vocab_size=vocab)
        for line in errors:
            print(f"FAIL {line}")
        if errors:
            sys.exit(1)
        print(f"OK {prefix}: .bin/.idx consistent" + (f", all ids < {vocab}" if vocab else ""))
    else:
        missing = [prefix + s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            sys.exit(f"error: {', '.join(missing)}: no such file")
    s = indexed.summarize(prefix)
    print(f"{prefix}: {s.documents:,} documents, {s.sequences:,} sequences, {s.tokens:,} tokens "
          f"({s.dtype}, {s.bin_bytes:,} bytes); tokens per sequence min {s.min_length} / mean "
          f"{s.mean_length:.1f} / max {s.max_length}")
    if args.decode:
        dataset = indexed.open_dataset(prefix)
        for k in args.decode:
            if not 0 <= k < s.documents:
                sys.exit(f"error: --decode {k}: {prefix} has documents 0..{s.documents - 1}")
            begin, end = dataset.document_indices[k], dataset.document_indices[k + 1]
            ids = [int(t) for i in range(begin, end) for t in dataset[i]]
            print(f"--- document {k}: {len(ids)} tokens")
            if args.ids or tokenizer is None:
                print(ids)
            if tokenizer is not None:
                print(tokenizer.detokenize(ids))


if __name__ == "__main__":
    main()
