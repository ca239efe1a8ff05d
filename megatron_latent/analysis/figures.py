"""Writing matplotlib figures: atomically, so a reader never sees half a PNG."""

from __future__ import annotations

import os


def save_png(fig, out_png: str, dpi: int = 120) -> None:
    """Write `fig` to `out_png` (its folder made if needed) through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out_png)
