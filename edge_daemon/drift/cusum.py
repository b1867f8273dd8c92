"""Tabular CUSUM (Page, 1954; Montgomery's tabular form) on standardised values:
the fast judge of an abrupt shift, in minutes, where a day-long window needs
half a day. It standardises by its own running mean and std, so its slack and
threshold mean the same on every channel's scale.
"""

from __future__ import annotations

import math

from edge_daemon.drift.base import DriftDetector, check_choice, check_range

MODES = ("up", "down", "both")


class CUSUM(DriftDetector):
    """Tabular CUSUM with a self-learnt mean and std.

    The first `warmup` values estimate the mean and variance (Welford); the
    detector is silent meanwhile. After that each value is standardised,
    z = (x - mean) / std, clipped to [-clip, clip], and accumulated:

        S_up   = max(0, S_up + z - k)      signals when S_up > h
        S_down = max(0, S_down - z - k)    signals when S_down > h

    `k` is the slack (a shift smaller than k standard deviations never
    accumulates; the classic choice is half the shift to be caught) and `h` the
    threshold, both in standard deviations. A shift of d > k standard
    deviations is found after about h / (d - k) values.

    After the warm-up the mean and variance keep following the stream as
    exponentially weighted averages with a memory of `warmup` values, so a
    slow change of scale (a process whose noise follows the time of day) is
    absorbed while an abrupt one, signalled within a small fraction of that
    memory, is not. The clip keeps a short spike (an anomaly, alerted on its
    own) from reading as a shift: it adds at most `clip - k` a value, and it
    bounds how far one spike moves the running estimates.

    A detection restarts the detector on the next update (DriftDetector's
    semantics): it re-learns mean and std on the new level, so one shift is
    reported once. Right after a detection, `onset_steps` says how many values
    ago the sum that fired last left zero: Page's estimate of when the shift
    began.
    """

    def __init__(
        self, k: float = 0.5, h: float = 8.0, warmup: int = 600, clip: float = 4.0, mode: str = "up"
    ) -> None:
        super().__init__()
        check_range("k", k, 0.0, math.inf, low_open=False, high_open=True)
        check_range("h", h, 0.0, math.inf, low_open=True, high_open=True)
        check_range("warmup", warmup, 2, math.inf, low_open=False, high_open=True)
        check_range("clip", clip, 0.0, math.inf, low_open=True, high_open=False)
        check_choice("mode", mode, MODES)
        if k >= clip:
            raise ValueError(f"k must be below clip (a clipped value must still accumulate), got k={k}, clip={clip}")
        self.k = float(k)
        self.h = float(h)
        self.warmup = int(warmup)
        self.clip = float(clip)
        self.mode = mode
        self._watch_up = mode in ("up", "both")
        self._watch_down = mode in ("down", "both")
        self._rate = 1.0 / self.warmup
        self._reset_state()

    def _reset_state(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._var = 0.0  # Welford's M2 during the warm-up, the variance after it
        self._std = 0.0
        self._sum_up = 0.0
        self._sum_down = 0.0
        self._run_up = 0  # values since _sum_up was last zero
        self._run_down = 0

    def seed(self, mean: float, std: float) -> None:
        """Skip the warm-up: start watching with this mean and std (a prior's, e.g. what a model's
        held-out residuals say), which the running estimates then refine as values arrive."""
        self.reset()
        self._n = self.warmup
        self._mean = float(mean)
        self._var = float(std) ** 2
        self._floor_std()

    @property
    def learning(self) -> bool:
        """Whether the detector is still learning the mean and std (and cannot fire)."""
        return self._n < self.warmup

    @property
    def samples(self) -> int:
        """Values seen since the last reset."""
        return self._n

    @property
    def mean(self) -> float:
        """Current estimate of the stream's mean."""
        return self._mean

    @property
    def std(self) -> float:
        """Current estimate of the stream's std (0 while learning)."""
        return self._std

    @property
    def onset_steps(self) -> int:
        """Values since the watched sum that is furthest along last left zero, this one included:
        after a detection, about how long ago the shift began (0 while nothing accumulates)."""
        up = self._run_up if self._watch_up and self._sum_up > 0 else 0
        down = self._run_down if self._watch_down and self._sum_down > 0 else 0
        return up if self._sum_up >= self._sum_down else down

    @property
    def statistic(self) -> float:
        """The larger of the watched cumulative sums, in standard deviations (0 while learning)."""
        return max(self._sum_up if self._watch_up else 0.0, self._sum_down if self._watch_down else 0.0)

    def _update(self, x: float) -> bool:
        self._n += 1
        if self._n <= self.warmup:
            delta = x - self._mean
            self._mean += delta / self._n
            self._var += delta * (x - self._mean)
            if self._n == self.warmup:
                self._var /= self._n
                self._floor_std()
            return False
        z = (x - self._mean) / self._std
        z = self.clip if z > self.clip else -self.clip if z < -self.clip else z
        # Track the clipped value, so a spike moves the estimates no more than
        # it moves the sums.
        clipped = self._mean + z * self._std
        delta = clipped - self._mean
        self._mean += self._rate * delta
        self._var = (1.0 - self._rate) * (self._var + self._rate * delta * delta)
        self._floor_std()
        if self._watch_up:
            self._sum_up = max(0.0, self._sum_up + z - self.k)
            self._run_up = self._run_up + 1 if self._sum_up > 0 else 0
        if self._watch_down:
            self._sum_down = max(0.0, self._sum_down - z - self.k)
            self._run_down = self._run_down + 1 if self._sum_down > 0 else 0
        return (self._watch_up and self._sum_up > self.h) or (self._watch_down and self._sum_down > self.h)

    def _floor_std(self) -> None:
        # A constant stream has no scale; a floor relative to its level keeps
        # the first different value from standardising to infinity.
        self._std = max(math.sqrt(self._var), 1e-9 * (1.0 + abs(self._mean)))
