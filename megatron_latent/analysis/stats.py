"""Small statistics for benchmark reports, free of any assumption about the spread."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Optional[Tuple[float, float]]:
    """A distribution-free confidence interval for the median of `values`: the order statistics
    (k, n + 1 - k) with the largest k for which Binomial(n, 1/2) puts at most (1 - confidence) / 2
    below k. Benchmarks' per-round ratios are skewed by a machine's slow drifts, so no normal
    approximation. None when n is too small for that confidence (n < 6 at 95%)."""
    v, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while True:
        tail += math.comb(n, k) / 2**n  # P(at most k of n below the median)
        if tail > (1 - confidence) / 2:
            break
        k += 1
    return None if k == 0 else (v[k - 1], v[n - k])
