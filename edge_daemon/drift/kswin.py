"""KSWIN (Raab et al., 2020): a two-sample Kolmogorov-Smirnov test between the
newest values of a sliding window and a random sample of its older part, so it
sees changes of spread and shape as well as of the mean.
"""

from __future__ import annotations

import collections
import math
import random

from edge_daemon.drift.base import DriftDetector, check_range


def ks_two_sided_pvalue(n: int, h: int) -> float:
    """Exact P(D >= h/n) for the two-sample KS statistic with both samples of size n.

    The alternating series of Gnedenko and Korolyuk, evaluated in nested
    (Horner) form so the terms do not cancel; the same evaluation scipy uses.
    """
    if h <= 0:
        return 1.0
    p = 0.0
    k = n // h
    while k >= 0:
        term = 1.0
        for j in range(h):
            term = (n - k * h - j) * term / (n + k * h + j + 1)
        p = term * (1.0 - p)
        k -= 1
    return min(max(2.0 * p, 0.0), 1.0)


class KSWIN(DriftDetector):
    """Kolmogorov-Smirnov windowing.

    Parameters follow river's `drift.KSWIN` and give the same detections for
    the same `seed`: `alpha` the significance of the test, `window_size` the
    sliding window, `stat_size` the newest part compared with an equally
    large random sample of the rest. Drift also needs the KS distance to
    exceed 0.1, as in river.
    """

    def __init__(
        self, alpha: float = 0.005, window_size: int = 100, stat_size: int = 30, seed: int | None = None
    ) -> None:
        super().__init__()
        check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_range("stat_size", stat_size, 1, math.inf, low_open=False, high_open=True)
        if window_size < 2 * stat_size:
            raise ValueError(
                f"window_size must be >= 2 * stat_size (the older part is sampled without replacement), "
                f"got window_size={window_size!r}, stat_size={stat_size!r}"
            )
        self.alpha = float(alpha)
        self.window_size = int(window_size)
        self.stat_size = int(stat_size)
        self.seed = seed
        # The statistic is h/stat_size for an integer h, so whether a test
        # fires depends on h only: decide it once per h here, not per step.
        self._fires = [
            ks_two_sided_pvalue(self.stat_size, h) <= self.alpha and h * 1.0 / self.stat_size > 0.1
            for h in range(self.stat_size + 1)
        ]
        self._older = range(self.window_size - self.stat_size)
        self._reset_state()

    def _reset_state(self) -> None:
        self._window: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self._rng = random.Random(self.seed)
        self.distance = 0.0  # KS distance of the last test

    def _update(self, x: float) -> bool:
        window = self._window
        window.append(x)
        if len(window) < self.window_size:
            return False
        n = self.stat_size
        sample = sorted([window[i] for i in self._rng.sample(self._older, n)])
        recent = sorted([window[i] for i in range(self.window_size - n, self.window_size)])
        h = _max_cdf_gap(sample, recent)
        self.distance = h / n
        return self._fires[h]


def _max_cdf_gap(a: list[float], b: list[float]) -> int:
    """max |#(a <= v) - #(b <= v)| over all values v, for sorted equal-length a, b."""
    n = len(a)
    i = j = gap = 0
    while i < n and j < n:
        v = a[i] if a[i] < b[j] else b[j]
        while i < n and a[i] <= v:
            i += 1
        while j < n and b[j] <= v:
            j += 1
        if abs(i - j) > gap:
            gap = abs(i - j)
    # Once one sample is used up the gap only closes.
    return gap
