"""A scaling study of latent thoughts (plan, run, analyse a grid of sizes x methods x seeds):
`megatron-latent-scaling-study` once installed (`pip install -e .`), or
`python -m megatron_latent.tools.scaling_study`; options with --help."""

import sys

from megatron_latent.tools.scaling_study import main

if __name__ == "__main__":
    sys.exit(main())
