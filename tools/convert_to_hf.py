"""A megatron checkpoint into a Hugging Face folder: `megatron-latent-convert-to-hf` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.convert_to_hf`; options with --help."""

import sys

from megatron_latent.tools.convert_to_hf import main

if __name__ == "__main__":  # guard: megatron's checkpoint code may start spawn processes
    sys.exit(main())
