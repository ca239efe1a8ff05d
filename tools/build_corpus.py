"""The offline quickstart corpus and a byte-level BPE tokenizer: `megatron-latent-build-corpus` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.build_corpus`; options with --help."""

import sys

from megatron_latent.tools.build_corpus import main

if __name__ == "__main__":
    sys.exit(main())
