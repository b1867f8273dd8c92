"""The typical size of a stream at each time of day, learnt over earlier days.

A forecaster's |residual| follows the clock: twice the night's by day when the
line runs, larger at shift changes. A detector that learns its normal level
from the last hour reads every morning's rise as a shift; one that judges each
value against the same time of day on earlier days does not
(`DriftMonitor`'s residual CUSUM, `[drift] cusum_by_time_of_day`).
"""

from __future__ import annotations

MAX_BINS = 96  # quarter hours of a day
MIN_BIN_STEPS = 60  # grid steps a bin covers each day, at least: fewer bins at slow periods


class TimeOfDayProfile:
    """Mean of a positive stream in each of `bins` slices of the day.

    A slice's mean is the plain mean of its values until it holds `memory_days`
    days of them, then an exponentially weighted one with that memory, so a
    slow change (a season) is followed while one day's events move it little.
    A slice learns its values once it is over: a shift is judged against the
    same time on earlier days (or a prior's), never against itself, which in a
    slice seeded by a prior (counted as a day) would absorb half the shift
    within the slice. `relative(t, x)` is x over the mean of t's slice; None
    until every slice of the day has values (a day of data): the time the
    profile needs before it can judge anything.
    """

    def __init__(self, period_s: float, day_s: float = 86400.0, memory_days: float = 7.0) -> None:
        if period_s <= 0 or day_s <= 0 or memory_days <= 0:
            raise ValueError("period_s, day_s and memory_days must be > 0")
        steps_a_day = day_s / period_s
        self.bins = int(max(1, min(MAX_BINS, steps_a_day // MIN_BIN_STEPS)))
        self.day_s = float(day_s)
        self._bin_s = self.day_s / self.bins
        self._min_rate = 1.0 / max(1.0, steps_a_day / self.bins * memory_days)
        self._steps_a_bin = max(1, round(steps_a_day / self.bins))  # one day's values in a slice
        self._mean = [0.0] * self.bins
        self._count = [0] * self.bins
        self._seeded = [False] * self.bins  # typical value given by a prior, not yet a day of the stream's
        self._ready = False
        self._open: int | None = None  # the slice being seen (slices since the epoch): learnt when it is over
        self._open_bin = 0
        self._open_sum = 0.0
        self._open_n = 0

    def _bin(self, t: float) -> int:
        return int((t % self.day_s) // self._bin_s) % self.bins

    @property
    def ready(self) -> bool:
        """Whether every slice of the day has a typical value."""
        return self._ready

    @property
    def learnt_fraction(self) -> float:
        """Share of the slices of the day that have values."""
        return sum(1 for n in self._count if n) / self.bins

    def typical(self, t: float) -> float | None:
        """The mean of t's slice (None while it has no values)."""
        b = self._bin(t)
        return self._mean[b] if self._count[b] else None

    def relative(self, t: float, x: float) -> float | None:
        """x over the typical value at t's time of day; None until the profile is ready (or the
        slice was seeded by a prior)."""
        self._close_before(t)
        b = self._bin(t)
        if not (self._ready or self._seeded[b]):
            return None
        return x / max(self._mean[b], 1e-12)

    def hour_typical(self, hour: int) -> float | None:
        """The mean of the slices of a UTC hour that have values (None: none has)."""
        start, end = hour * 3600.0, (hour + 1) * 3600.0
        values = [self._mean[b] for b in range(self.bins)
                  if self._count[b] and start <= (b + 0.5) * self._bin_s < end]  # fmt: skip
        return sum(values) / len(values) if values else None

    def seed(self, hourly: list[float | None], scale: float | None = None) -> None:
        """Start every slice whose UTC hour `hourly` (24 values) covers from that typical value,
        and (with `scale`) every other slice that has learnt one from that value times `scale`,
        each counted as one day of values: the first day of the stream refines it half-way, later
        days further. Slices neither covers keep what they had (nothing, at start-up). The values
        of the slice being seen are another model's: dropped."""
        self._open, self._open_sum, self._open_n = None, 0.0, 0
        for b in range(self.bins):
            typical = hourly[int(((b + 0.5) * self._bin_s % 86400.0) // 3600.0)]
            if typical is None and scale is not None and self._count[b]:
                typical = self._mean[b] * scale
            if typical is None:
                self._seeded[b] = False
                continue
            self._mean[b], self._count[b], self._seeded[b] = typical, self._steps_a_bin, True
        self._ready = all(self._count) and not any(self._seeded)

    @property
    def seeded(self) -> bool:
        """Whether any slice still judges by a prior's value rather than a day of the stream's."""
        return any(self._seeded)

    def learn(self, t: float, x: float) -> None:
        """Add a value seen at time t: its slice learns it once the slice is over."""
        self._close_before(t)
        self._open, self._open_bin = int(t // self._bin_s), self._bin(t)
        self._open_sum += x
        self._open_n += 1

    def _close_before(self, t: float) -> None:
        """Learn the slice being seen if t lies past it."""
        if self._open is None or self._open == int(t // self._bin_s) or not self._open_n:
            return
        b, m, mean = self._open_bin, self._open_n, self._open_sum / self._open_n
        self._open, self._open_sum, self._open_n = None, 0.0, 0
        n = self._count[b] = self._count[b] + m
        # m values at once: the plain mean's weight, or the EWMA's after m steps, whichever is larger.
        self._mean[b] += max(m / n, 1.0 - (1.0 - self._min_rate) ** m) * (mean - self._mean[b])
        if self._seeded[b] and n >= 2 * self._steps_a_bin:
            self._seeded[b] = False  # a day of the stream's own values: learnt
        self._ready = all(self._count) and not any(self._seeded)
