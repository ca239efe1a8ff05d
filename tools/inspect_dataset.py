"""Counts, documents and integrity of an indexed dataset: `megatron-latent-inspect-dataset` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.inspect_dataset`; options with --help."""

import sys

from megatron_latent.tools.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
