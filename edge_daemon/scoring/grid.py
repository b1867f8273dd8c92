"""Streamed readings -> completed grid steps, by the same grid rule as `frames.build_grid`.

The grid's horizon follows the stream, not its outliers: one reading stamped far ahead of the
rest (a sensor's clock glitch, a corrupt timestamp the time window let through) would otherwise
complete every step up to it at once and make every later reading of the real stream late.
Such a reading is set aside until readings at later steps confirm it (the whole stream jumped:
a sensor clock corrected, a gap after an outage) or the stream moves on without it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edge_daemon.frames import bucket_of

# A reading further ahead of the stream's newest than the arrival time elapsed since that newest
# advanced, plus this floor (max of the two), is set aside rather than moving the horizon. The
# elapsed time lets a real gap through (sensors silent for an hour come back an hour later); the
# floor absorbs jitter, batching and a slow scoring thread.
OUTLIER_FLOOR_S = 60.0
OUTLIER_FLOOR_STEPS = 10
# Readings set aside together are confirmed (and the grid jumps to them) once they cover this many
# distinct grid steps after their first: one glitch does not repeat itself at later steps.
CONFIRM_STEPS = 3
# ... and dropped (counted as outliers) once the accepted stream has advanced this many steps
# past where it stood when they were set aside: the stream went on without them. Equal to
# CONFIRM_STEPS, so a real stream that keeps advancing wins over a clock that runs apart from it.
DROP_STEPS = 3
# At most this many readings wait for confirmation; beyond it the oldest group is dropped.
MAX_SET_ASIDE = 10_000
# Steps this far from 0 are not a time any clock stamps (float64 loses whole steps beyond it).
_MAX_STEP = 2.0**52


@dataclass(frozen=True)
class GridStep:
    """One completed grid step; NaN where a channel had no reading within the fill limit."""

    t: float
    values: np.ndarray  # (C,) float64, raw units


@dataclass
class AssemblerStats:
    accepted: int = 0
    late: int = 0  # arrived after their step was emitted
    last_late_ts: float | None = None  # timestamp of the latest reading counted late
    unknown_channel: int = 0
    non_finite: int = 0
    outliers: int = 0  # set aside far ahead of the stream, then dropped unconfirmed
    jumps: int = 0  # groups set aside then confirmed: the grid followed the stream forward


@dataclass
class _AsideGroup:
    """Readings set aside together: consistent with each other, far ahead of the stream."""

    base_k: int  # the accepted stream's newest step when the first of them was set aside
    oldest_ts: float
    newest_ts: float
    readings: list[tuple[int, int, float, float]] = field(default_factory=list)  # (column, k, ts, value)
    steps: set[int] = field(default_factory=set)


class GridAssembler:
    """Turns batches of (channel, ts, value) readings into completed grid steps, in time order.

    Step k covers ts in [(k - 0.5) * period, (k + 0.5) * period) and is complete
    once a reading later than its end + `lateness_s` has arrived (or, with
    `flush(now)`, once the clock is past that). Within a step the newest reading
    per channel wins; a channel without one is forward-filled from its last
    value for at most `max_fill_steps` steps. Stretches where nothing is known
    are skipped rather than emitted as rows of NaN.

    A reading far ahead of the stream (see OUTLIER_FLOOR_S) is set aside; see the module docstring.
    `mono` is the monotonic clock arrivals are measured by (a test passes its own).
    """

    def __init__(
        self,
        channels: list[str],
        period_s: float,
        max_fill_steps: int,
        lateness_s: float = 1.0,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        if max_fill_steps < 0 or lateness_s < 0:
            raise ValueError("max_fill_steps and lateness_s must be >= 0")
        self.channels = list(channels)
        self.period_s = float(period_s)
        self.max_fill_steps = int(max_fill_steps)
        self.lateness_s = float(lateness_s)
        self.outlier_floor_s = max(OUTLIER_FLOOR_S, OUTLIER_FLOOR_STEPS * self.period_s)
        self._mono = mono
        self._index = {name: i for i, name in enumerate(self.channels)}
        n = len(self.channels)
        # Pending steps: values and the ts that set each value (newest wins).
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._next_k: int | None = None  # first step not yet emitted
        self._newest_ts = -math.inf  # newest accepted reading: the horizon, never an outlier's
        self._newest_k: int | None = None  # its step
        self._newest_at = 0.0  # when (by `mono`) it last advanced
        self._aside: list[_AsideGroup] = []
        self._aside_count = 0  # readings in `_aside`
        self._last_value = np.full(n, np.nan)
        self._last_k = np.full(n, np.iinfo(np.int64).min // 2, dtype=np.int64)  # step of each channel's last value
        self.stats = AssemblerStats()

    @property
    def newest_ts(self) -> float | None:
        """The newest accepted reading's time (readings set aside do not count), None before any."""
        return self._newest_ts if self._newest_ts != -math.inf else None

    @property
    def set_aside(self) -> int:
        """Readings waiting, set aside, for later readings to confirm them."""
        return self._aside_count

    def add(self, readings: Iterable[tuple[str, float, float]]) -> list[GridStep]:
        """Feed a batch of readings; return the steps it completed (possibly none)."""
        batch = sorted(readings, key=lambda reading: reading[1])
        now = self._mono()
        for channel, ts, value in batch:
            column = self._index.get(channel)
            if column is None:
                self.stats.unknown_channel += 1
                continue
            if not (math.isfinite(ts) and math.isfinite(value)) or abs(ts / self.period_s) >= _MAX_STEP:
                self.stats.non_finite += 1
                continue
            self._route(column, int(bucket_of(ts, self.period_s)), float(ts), float(value), now)
        return self._emit_until(self._newest_ts)

    def flush(self, now: float) -> list[GridStep]:
        """Complete steps by the clock when readings stop arriving (call periodically with time.time())."""
        return self._emit_until(now)

    # -- where a reading goes ------------------------------------------------------------------

    def _route(self, column: int, k: int, ts: float, value: float, now: float) -> None:
        if self._next_k is None:
            self._next_k = k
        if k < self._next_k:
            self.stats.late += 1
            self.stats.last_late_ts = ts
            return
        allowed = self._newest_ts + self.outlier_floor_s + max(0.0, now - self._newest_at)
        if self._newest_k is not None and ts > allowed:
            self._set_aside(column, k, ts, value, now)
            return
        self._accept(column, k, ts, value, now)

    def _accept(self, column: int, k: int, ts: float, value: float, now: float) -> None:
        values, stamps = self._pending.setdefault(
            k, (np.full(len(self.channels), np.nan), np.full(len(self.channels), -np.inf))
        )
        if ts >= stamps[column]:
            values[column] = value
            stamps[column] = ts
        self.stats.accepted += 1
        if ts > self._newest_ts:
            self._newest_ts, self._newest_k, self._newest_at = ts, k, now
            if self._aside:
                self._drop_passed()

    def _set_aside(self, column: int, k: int, ts: float, value: float, now: float) -> None:
        assert self._newest_k is not None  # the first reading is always accepted
        floor = self.outlier_floor_s
        # Consistent with a group: within the floor of the span its readings cover so far.
        group = next((g for g in self._aside if g.oldest_ts - floor <= ts <= g.newest_ts + floor), None)
        if group is None:
            group = _AsideGroup(base_k=self._newest_k, oldest_ts=ts, newest_ts=ts)
            self._aside.append(group)
        group.readings.append((column, k, ts, value))
        self._aside_count += 1
        group.steps.add(k)
        group.oldest_ts, group.newest_ts = min(group.oldest_ts, ts), max(group.newest_ts, ts)
        if len(group.steps) > CONFIRM_STEPS:
            self._confirm(group, now)
        elif self._aside_count > MAX_SET_ASIDE:
            self._drop(self._aside[0])

    def _confirm(self, group: _AsideGroup, now: float) -> None:
        """The stream itself jumped: the grid follows it, and the other groups are judged again."""
        self.stats.jumps += 1
        others = [reading for other in self._aside if other is not group for reading in other.readings]
        self._aside, self._aside_count = [], 0
        assert self._next_k is not None
        for column, k, ts, value in sorted(group.readings, key=lambda reading: reading[2]):
            if k < self._next_k:  # a flush by the clock went past them meanwhile
                self.stats.late += 1
                self.stats.last_late_ts = ts
            else:
                self._accept(column, k, ts, value, now)
        for column, k, ts, value in sorted(others, key=lambda reading: reading[2]):
            self._route(column, k, ts, value, now)

    def _drop_passed(self) -> None:
        assert self._newest_k is not None
        for group in [g for g in self._aside if self._newest_k - g.base_k >= DROP_STEPS]:
            self._drop(group)

    def _drop(self, group: _AsideGroup) -> None:
        self._aside.remove(group)
        self._aside_count -= len(group.readings)
        self.stats.outliers += len(group.readings)

    # -- completed steps -----------------------------------------------------------------------

    def _emit_until(self, horizon_ts: float) -> list[GridStep]:
        if self._next_k is None or not np.isfinite(horizon_ts):
            return []
        # Last step k with (k + 0.5) * period + lateness <= horizon.
        last_complete = int(np.floor((horizon_ts - self.lateness_s) / self.period_s - 0.5))
        steps: list[GridStep] = []
        k = self._next_k
        while k <= last_complete:
            fill_alive = (k - self._last_k) <= self.max_fill_steps
            if k not in self._pending and not fill_alive.any():
                # Nothing known and nothing to fill: jump to the next step with readings.
                later = [p for p in self._pending if p > k]
                k = min(min(later), last_complete + 1) if later else last_complete + 1
                continue
            values, _ = self._pending.pop(k, (np.full(len(self.channels), np.nan), None))
            observed = ~np.isnan(values)
            self._last_value[observed] = values[observed]
            self._last_k[observed] = k
            fill = ~observed & ((k - self._last_k) <= self.max_fill_steps)
            values[fill] = self._last_value[fill]
            steps.append(GridStep(t=k * self.period_s, values=values))
            k += 1
        self._next_k = k
        return steps
