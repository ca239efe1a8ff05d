"""A corpus into megatron indexed datasets: `megatron-latent-preprocess` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.preprocess_data`; options with --help."""

import sys

from megatron_latent.tools.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
