"""Streamed readings -> completed grid steps, by the same grid rule as `frames.build_grid`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edge_daemon.frames import bucket_of


@dataclass(frozen=True)
class GridStep:
    """One completed grid step; NaN where a channel had no reading within the fill limit."""

    t: float
    values: np.ndarray  # (C,) float64, raw units


@dataclass
class AssemblerStats:
    accepted: int = 0
    late: int = 0  # arrived after their step was emitted
    unknown_channel: int = 0
    non_finite: int = 0


class GridAssembler:
    """Turns batches of (channel, ts, value) readings into completed grid steps, in time order.

    Step k covers ts in [(k - 0.5) * period, (k + 0.5) * period) and is complete
    once a reading later than its end + `lateness_s` has arrived (or, with
    `flush(now)`, once the clock is past that). Within a step the newest reading
    per channel wins; a channel without one is forward-filled from its last
    value for at most `max_fill_steps` steps. Stretches where nothing is known
    are skipped rather than emitted as rows of NaN.
    """

    def __init__(self, channels: list[str], period_s: float, max_fill_steps: int, lateness_s: float = 1.0) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        if max_fill_steps < 0 or lateness_s < 0:
            raise ValueError("max_fill_steps and lateness_s must be >= 0")
        self.channels = list(channels)
        self.period_s = float(period_s)
        self.max_fill_steps = int(max_fill_steps)
        self.lateness_s = float(lateness_s)
        self._index = {name: i for i, name in enumerate(self.channels)}
        n = len(self.channels)
        # Pending steps: values and the ts that set each value (newest wins).
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._next_k: int | None = None  # first step not yet emitted
        self._newest_ts = -np.inf
        self._last_value = np.full(n, np.nan)
        self._last_k = np.full(n, np.iinfo(np.int64).min // 2, dtype=np.int64)  # step of each channel's last value
        self.stats = AssemblerStats()

    def add(self, readings: Iterable[tuple[str, float, float]]) -> list[GridStep]:
        """Feed a batch of readings; return the steps it completed (possibly none)."""
        batch = sorted(readings, key=lambda reading: reading[1])
        for channel, ts, value in batch:
            column = self._index.get(channel)
            if column is None:
                self.stats.unknown_channel += 1
                continue
            if not (np.isfinite(ts) and np.isfinite(value)):
                self.stats.non_finite += 1
                continue
            k = int(bucket_of(ts, self.period_s))
            if self._next_k is None:
                self._next_k = k
            if k < self._next_k:
                self.stats.late += 1
                continue
            values, stamps = self._pending.setdefault(
                k, (np.full(len(self.channels), np.nan), np.full(len(self.channels), -np.inf))
            )
            if ts >= stamps[column]:
                values[column] = value
                stamps[column] = ts
            self._newest_ts = max(self._newest_ts, float(ts))
            self.stats.accepted += 1
        return self._emit_until(self._newest_ts)

    def flush(self, now: float) -> list[GridStep]:
        """Complete steps by the clock when readings stop arriving (call periodically with time.time())."""
        return self._emit_until(now)

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
