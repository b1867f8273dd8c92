"""ADWIN (Bifet & Gavaldà, 2007): an adaptive window over the stream that is
cut when two of its sub-windows have significantly different means. Kept in
exponential-histogram buckets (ADWIN2), so memory is O(log width).
"""

from __future__ import annotations

import math

from edge_daemon.drift.base import DriftDetector, check_range


class ADWIN(DriftDetector):
    """Adaptive windowing on the mean of a real-valued stream.

    Parameters follow river's `drift.ADWIN` and give the same detections on
    the same stream: `delta` is the significance of a cut, `clock` how many
    updates pass between checks, `max_buckets` how many buckets of one size
    are kept before the oldest two merge, `min_window_length` the smallest
    sub-window a cut may leave, `grace_period` the width below which no cut
    is checked.
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        super().__init__()
        check_range("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        check_range("clock", clock, 1, math.inf, low_open=False, high_open=True)
        check_range("max_buckets", max_buckets, 2, math.inf, low_open=False, high_open=True)
        check_range("min_window_length", min_window_length, 1, math.inf, low_open=False, high_open=True)
        check_range("grace_period", grace_period, 0, math.inf, low_open=False, high_open=True)
        self.delta = float(delta)
        self.clock = int(clock)
        self.max_buckets = int(max_buckets)
        self.min_window_length = int(min_window_length)
        self.grace_period = int(grace_period)
        self._reset_state()

    def _reset_state(self) -> None:
        # Row r holds up to max_buckets (+1 transiently) buckets of 2**r
        # items each, oldest first: the sum and the sum of squared
        # deviations (not divided) of the items it summarises.
        self._totals: list[list[float]] = [[]]
        self._variances: list[list[float]] = [[]]
        self._width = 0.0
        self._total = 0.0
        self._variance = 0.0  # sum of squared deviations over the window
        self._tick = 0

    @property
    def width(self) -> int:
        """Number of items in the current window."""
        return int(self._width)

    @property
    def estimation(self) -> float:
        """Mean of the current window (0.0 when empty)."""
        return self._total / self._width if self._width else 0.0

    @property
    def variance(self) -> float:
        """Sum of squared deviations from the mean over the current window."""
        return self._variance

    def _update(self, x: float) -> bool:
        self._insert(x)
        self._tick += 1
        if self._tick % self.clock or self._width <= self.grace_period:
            return False
        return self._shrink_while_cut()

    def _insert(self, x: float) -> None:
        # Streaming variance (Welford form), before the new item joins total.
        width = self._width + 1.0
        if width > 1.0:
            diff = x - self._total / (width - 1.0)
            self._variance += (width - 1.0) * diff * diff / width
        self._width = width
        self._total += x
        self._totals[0].append(x)
        self._variances[0].append(0.0)
        # Merge the two oldest buckets of a full row into one of the next
        # size, cascading while rows overflow.
        row = 0
        while len(self._totals[row]) > self.max_buckets:
            if row + 1 == len(self._totals):
                self._totals.append([])
                self._variances.append([])
            size = float(1 << row)
            t0, t1 = self._totals[row][0], self._totals[row][1]
            mean_gap = t0 / size - t1 / size
            self._totals[row + 1].append(t0 + t1)
            self._variances[row + 1].append(
                self._variances[row][0] + self._variances[row][1] + size * 0.5 * mean_gap * mean_gap
            )
            del self._totals[row][:2]
            del self._variances[row][:2]
            row += 1

    def _shrink_while_cut(self) -> bool:
        detected = False
        cut = True
        while cut:
            cut = False
            width = self._width
            # Terms of the cut threshold that do not depend on the cut point.
            delta_prime = math.log(2.0 * math.log(width) / self.delta)
            variance_in_window = self._variance / width
            offset = self.min_window_length - 1.0
            n0 = 0.0
            u0 = 0.0
            n1 = width
            u1 = self._total
            # Walk every cut point from the oldest bucket to the newest; the
            # newest bucket never goes wholly into the old sub-window.
            last_row = len(self._totals) - 1
            for row in range(last_row, -1, -1):
                size = float(1 << row)
                totals = self._totals[row]
                last_k = len(totals) - 1
                for k, bucket_total in enumerate(totals):
                    n0 += size
                    n1 -= size
                    u0 += bucket_total
                    u1 -= bucket_total
                    if row == 0 and k == last_k:
                        break
                    if n0 < self.min_window_length or n1 < self.min_window_length:
                        continue
                    m_recip = 1.0 / (n0 - offset) + 1.0 / (n1 - offset)
                    spread = 2.0 * m_recip * variance_in_window * delta_prime
                    if spread < 0.0:
                        continue  # rounding made the variance negative: no valid bound
                    epsilon = math.sqrt(spread) + 2.0 / 3.0 * delta_prime * m_recip
                    if abs(u0 / n0 - u1 / n1) > epsilon:
                        detected = True
                        cut = True
                        break
                if cut:
                    break
            if cut:
                self._drop_oldest_bucket()
        return detected

    def _drop_oldest_bucket(self) -> None:
        row = len(self._totals) - 1
        size = float(1 << row)
        bucket_total = self._totals[row][0]
        bucket_variance = self._variances[row][0]
        self._width -= size
        self._total -= bucket_total
        gap = bucket_total / size - self._total / self._width
        self._variance -= bucket_variance + size * self._width * gap * gap / (size + self._width)
        del self._totals[row][0]
        del self._variances[row][0]
        if not self._totals[row] and row > 0:
            self._totals.pop()
            self._variances.pop()
