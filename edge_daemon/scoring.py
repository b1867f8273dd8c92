"""Live scoring: streamed readings -> completed grid steps -> forecast, residual and anomaly score.

`GridAssembler` applies the same grid rule as `frames.build_grid` to a stream;
`Scorer` keeps a rolling window of normalised steps and runs the serving
model (base with the current adapter merged in) once per completed step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from edge_daemon.adapters import BaseModel
from edge_daemon.frames import bucket_of
from edge_daemon.model import Forecaster, anomaly_score

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ScoreResult:
    """Scoring of one grid step: how well it was forecast, and the forecast of the next one."""

    t: float  # time of the step just scored
    actual: np.ndarray  # (C,) raw values of step t
    forecast_t: float  # time the forecast is for (t + period)
    forecast: np.ndarray  # (C,) raw units, forecast of step forecast_t
    residual: np.ndarray | None  # (C,) normalised forecast - actual at t; None without a forecast for t
    score: float | None  # anomaly score at t (~1 normal); None without a forecast for t
    anomaly: bool  # score above the threshold
    model_version: int | None  # adapter version that made the forecast for t (None: base alone)


class Scorer:
    """Scores every completed grid step with the serving model.

    Keeps the last `window` normalised steps. A step with a NaN channel or a
    skipped step (a gap) clears the history, as gaps split training windows.
    Forecasts start once `min_history` consecutive steps are buffered.
    """

    def __init__(
        self,
        base: BaseModel,
        merged_model: Forecaster,
        anomaly_threshold: float,
        min_history: int | None = None,
        version: int | None = None,
    ) -> None:
        self.base = base
        self.window = base.cfg.window
        self.min_history = self.window if min_history is None else int(min_history)
        if not 1 <= self.min_history <= self.window:
            raise ValueError(f"min_history must be in [1, {self.window}], got {min_history}")
        self.anomaly_threshold = float(anomaly_threshold)
        self._residual_scale = base.residual_scale_tensor()
        self._lock = threading.Lock()
        self._model = merged_model.eval()
        self._version = version
        self._buffer = np.zeros((self.window, len(base.channels)), dtype=np.float32)  # (window, C) ring, oldest first
        self._filled = 0
        self._last_t: float | None = None
        self._pending_forecast: np.ndarray | None = None  # (C,) normalised forecast of the next step
        self._pending_version: int | None = None

    @property
    def version(self) -> int | None:
        return self._version

    @property
    def model(self) -> Forecaster:
        """The merged model being served."""
        with self._lock:
            return self._model

    def swap_model(self, merged_model: Forecaster, version: int | None = None) -> None:
        """Serve a new merged model from the next step on; a step being scored finishes with the old one."""
        merged_model.eval()
        with self._lock:
            self._model = merged_model
            self._version = version
        log.info("scoring with adapter %s", f"v{version}" if version is not None else "none (base model)")

    def reset(self) -> None:
        self._filled = 0
        self._last_t = None
        self._pending_forecast = None

    def add_step(self, t: float, values: np.ndarray) -> ScoreResult | None:
        """Score the step at time `t` (raw (C,) values, NaN allowed); None while there is not enough history."""
        with self._lock:
            model, version = self._model, self._version
        raw = np.asarray(values, dtype=np.float64)
        assert raw.shape == (len(self.base.channels),), f"expected {len(self.base.channels)} values, got {raw.shape}"
        period = self.base.period_s
        contiguous = self._last_t is not None and abs(t - (self._last_t + period)) < 0.5 * period
        if not contiguous:
            self.reset()
        if np.isnan(raw).any():
            self.reset()
            return None
        self._last_t = t
        x = self.base.norm.apply(raw)  # (C,)

        residual = score = None
        anomaly = False
        forecast_version = self._pending_version
        if self._pending_forecast is not None:
            residual = (self._pending_forecast - x).astype(np.float32)
            score = float(anomaly_score(torch.from_numpy(residual), self._residual_scale))
            anomaly = score > self.anomaly_threshold

        # Append to the rolling window (oldest first).
        if self._filled < self.window:
            self._buffer[self._filled] = x
            self._filled += 1
        else:
            self._buffer[:-1] = self._buffer[1:]
            self._buffer[-1] = x
        if self._filled < self.min_history:
            self._pending_forecast = None
            return None

        history = torch.from_numpy(self._buffer[: self._filled]).unsqueeze(0)  # (1, T, C)
        with torch.inference_mode():
            next_norm = model(history)[0, -1].numpy().copy()  # (C,)
        self._pending_forecast = next_norm
        self._pending_version = version
        return ScoreResult(
            t=t,
            actual=raw,
            forecast_t=t + period,
            forecast=self.base.norm.invert(next_norm),
            residual=residual,
            score=score,
            anomaly=anomaly,
            model_version=forecast_version if residual is not None else None,
        )
