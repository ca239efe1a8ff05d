"""One table and one PNG comparing finished runs: `megatron-latent-compare-runs` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.compare_runs`; options with --help."""

import sys

from megatron_latent.tools.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
