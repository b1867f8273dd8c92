"""Page-Hinkley test (Page, 1954): a cumulative sum of deviations from the
running mean, with a forgetting factor, that signals when it rises (or falls)
further than a threshold from its extreme.
"""

from __future__ import annotations

import math

from edge_daemon.drift.base import DriftDetector, check_choice, check_range

MODES = ("up", "down", "both")


class PageHinkley(DriftDetector):
    """Page-Hinkley change detector on the mean.

    Parameters follow river's `drift.PageHinkley` and give the same
    detections: `min_instances` values before it may fire, `delta` the
    change of the mean tolerated per step, `threshold` (lambda) the
    cumulative deviation that signals drift, `alpha` the forgetting factor
    of the sums, `mode` which direction of change counts.
    """

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        super().__init__()
        check_range("min_instances", min_instances, 1, math.inf, low_open=False, high_open=True)
        check_range("delta", delta, 0.0, math.inf, low_open=False, high_open=True)
        check_range("threshold", threshold, 0.0, math.inf, low_open=True, high_open=True)
        check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=False)
        check_choice("mode", mode, MODES)
        self.min_instances = int(min_instances)
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.mode = mode
        self._watch_up = mode in ("up", "both")
        self._watch_down = mode in ("down", "both")
        self._reset_state()

    def _reset_state(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._sum_up = 0.0
        self._sum_down = 0.0
        self._min_up = math.inf
        self._max_down = -math.inf

    @property
    def estimation(self) -> float:
        """Running mean since the last reset."""
        return self._mean

    def _update(self, x: float) -> bool:
        self._n += 1
        self._mean += (1.0 / self._n) * (x - self._mean)
        deviation = x - self._mean
        # Two sums: one drifts down by delta per step (an increase must beat
        # it), the other up by delta (a decrease must beat it).
        self._sum_up = self.alpha * self._sum_up + deviation - self.delta
        self._sum_down = self.alpha * self._sum_down + deviation + self.delta
        if self._sum_up < self._min_up:
            self._min_up = self._sum_up
        if self._sum_down > self._max_down:
            self._max_down = self._sum_down
        if self._n < self.min_instances:
            return False
        return (self._watch_up and self._sum_up - self._min_up > self.threshold) or (
            self._watch_down and self._max_down - self._sum_down > self.threshold
        )
