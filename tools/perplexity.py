"""Perplexity of a Hugging Face folder: `megatron-latent-perplexity` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.perplexity`; options with --help."""

import sys

from megatron_latent.tools.perplexity import main

if __name__ == "__main__":
    sys.exit(main())
