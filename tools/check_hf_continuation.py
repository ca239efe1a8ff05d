"""A Hugging Face export's greedy continuation against megatron generation:
`megatron-latent-check-hf-continuation` once installed (`pip install -e .`), or
`python -m megatron_latent.tools.check_hf_continuation`; options with --help."""

import sys

from megatron_latent.tools.check_hf_continuation import main

if __name__ == "__main__":
    sys.exit(main())
