"""Training curves of runs into a PNG: `megatron-latent-plot-metrics` once installed
(`pip install -e .`), or `python -m megatron_latent.tools.plot_metrics`; options with --help."""

import sys

from megatron_latent.tools.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
