"""A Hugging Face folder into a megatron checkpoint: `megatron-latent-convert-from-hf` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.convert_from_hf`; options with --help."""

import sys

from megatron_latent.tools.convert_from_hf import main

if __name__ == "__main__":  # guard: megatron's checkpoint code may start spawn processes
    sys.exit(main())
