"""Independent reference computations the tests compare sensq with (written from the textbook definition, not
from sensq's code)."""
from __future__ import annotations

import numpy as np
from scipy.stats import binom


def median_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for a median: (x_(k), x_(n-k+1)) for the largest k whose coverage
    1 - 2 P(Bin(n, 1/2) <= k - 1) is still >= level; the whole range when no k reaches it."""
    x = np.sort(np.asarray(values, np.float64))
    n = len(x)
    ks = [k for k in range(1, n // 2 + 1) if 1 - 2 * binom.cdf(k - 1, n, 0.5) >= level]
    k = max(ks) if ks else 1
    return float(x[k - 1]), float(x[n - k])
