"""What the model's own held-out validation residuals say is normal: the prior the residual judges
start from after start-up and after an accepted adapter, instead of learning for a day.

A base's pretraining holds out its newest windows, an update the newest `val_fraction` of its
recent ones. Their last-position residuals (forecast - actual, normalised units: what the scorer
feeds drift) are summarised per forecast channel (`validation_residuals`) and stored in the base's
and the adapter's meta as `validation_residuals`. The drift monitor reads them back
(`ResidualPrior.from_json`):

- the day-long window judges its partial fill against the typical |residual| the prior expects
  at the hours it has seen, until it is full and its own first window becomes the baseline;
- the CUSUM's time-of-day profile starts with the prior's hourly |residual| in the hours it covers
  (counted as one day of observations, so the first day refines it half-way and later days
  further), and the CUSUM's mean and std with what the held-out half-minute means say.

An adapter's validation windows are its update's newest few minutes: every hour is judged from
what the judges held for it (learnt from the stream, or the base's prior), times the adapter's
mean |residual| over the incumbent's on those same windows (`incumbent_mean_abs`), a paired
comparison that the time of day of those minutes does not bias. A base's hours the validation
windows do not cover are filled from the training windows' residuals at that hour, scaled by how
much larger the held-out residuals are than the training ones (a model is never assumed better
off its training data than on it); hours neither covers stay unknown and are learnt from the
stream, as without a prior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import numpy as np

HOURS = 24
BLOCK_S = 30.0  # the CUSUM's default block ([drift] cusum_block_s): the spread is of means this long
MIN_HOUR_VALUES = 30  # residuals an hour needs to say what is typical then
MIN_BLOCKS = 10  # half-minute means needed for a spread


class ValidationResiduals(TypedDict):
    """Per forecast channel, the model's |residual| on held-out windows (normalised units): the
    `validation_residuals` of a base's or an adapter's meta."""

    windows: int  # held-out windows summarised
    mean_abs: list[float]  # mean |residual| per channel
    block_s: float  # seconds of the means whose spread `block_cv` is
    block_cv: list[float | None]  # std / mean of the block means of |residual| over the typical at their hour (None: too few blocks)
    hourly_mean_abs: list[list[float | None]]  # per channel, 24 UTC hours: typical |residual| (None: not covered)
    # An adapter's: the incumbent's mean |residual| on the same held-out windows (absent for a base,
    # and for adapters from before it was recorded)
    incumbent_mean_abs: NotRequired[list[float]]


def _hourly(magnitudes: np.ndarray, hours: np.ndarray) -> list[list[float | None]]:
    out: list[list[float | None]] = []
    for c in range(magnitudes.shape[1]):
        row: list[float | None] = []
        for h in range(HOURS):
            values = magnitudes[hours == h, c]
            values = values[np.isfinite(values)]
            row.append(float(values.mean()) if len(values) >= MIN_HOUR_VALUES else None)
        out.append(row)
    return out


def validation_residuals(
    errors: np.ndarray,
    end_times: np.ndarray,
    *,
    train_errors: np.ndarray | None = None,
    train_end_times: np.ndarray | None = None,
    block_s: float = BLOCK_S,
    timed: bool = True,
) -> ValidationResiduals | None:
    """Summarise (M, C) held-out residuals at the windows' end times (unix seconds); optionally
    (K, C) residuals of training windows fill the hours the held-out ones miss. Without real times
    (`timed` False: windows given without end times) every hour is the held-out mean. None
    without any residuals."""
    errors = np.abs(np.asarray(errors, dtype=np.float64))
    end_times = np.asarray(end_times, dtype=np.float64)
    if errors.ndim != 2 or len(errors) == 0 or len(end_times) != len(errors):
        return None
    n_channels = errors.shape[1]
    mean_abs = np.nanmean(errors, axis=0)
    hourly = _hourly(errors, ((end_times % 86400.0) // 3600.0).astype(int))
    if train_errors is not None and train_end_times is not None and len(train_errors):
        train = np.abs(np.asarray(train_errors, dtype=np.float64))
        train_hourly = _hourly(train, ((np.asarray(train_end_times) % 86400.0) // 3600.0).astype(int))
        for c in range(n_channels):
            # Held out versus trained on: never below 1.
            gap = max(1.0, float(mean_abs[c]) / max(float(np.nanmean(train[:, c])), 1e-12))
            for h in range(HOURS):
                if hourly[c][h] is None and train_hourly[c][h] is not None:
                    hourly[c][h] = float(train_hourly[c][h]) * gap  # type: ignore[operator]
    if not timed:
        hourly = [[float(mean_abs[c])] * HOURS for c in range(n_channels)]
    # The spread of the half-minute means the CUSUM reads, each over the typical |residual| at its hour.
    blocks = np.floor(end_times / block_s)
    cv: list[float | None] = []
    for c in range(n_channels):
        typical = np.array([hourly[c][int(h)] or float(mean_abs[c]) for h in (end_times % 86400.0) // 3600.0])
        relative = errors[:, c] / np.maximum(typical, 1e-12)
        ids, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=relative)
        full = counts >= max(1, int(np.median(counts)) // 2)
        means = sums[full] / counts[full]
        cv.append(float(np.std(means) / max(float(np.mean(means)), 1e-12)) if len(means) >= MIN_BLOCKS else None)
    return {
        "windows": int(len(errors)),
        "mean_abs": [float(v) for v in mean_abs],
        "block_s": float(block_s),
        "block_cv": cv,
        "hourly_mean_abs": hourly,
    }


@dataclass(frozen=True)
class ResidualPrior:
    """One channel's prior: typical |residual| overall and by UTC hour, and the spread of block means."""

    mean_abs: float
    hourly: tuple[float | None, ...]  # 24
    block_cv: float | None
    block_s: float
    # An adapter's mean |residual| over the incumbent's on the same held-out windows (None: a base's
    # prior, or an adapter from before it was recorded)
    incumbent_ratio: float | None = None

    @staticmethod
    def from_json(data: Mapping[str, Any] | None, n_channels: int) -> list[ResidualPrior] | None:
        """Per channel, the prior a meta's `validation_residuals` holds; None when absent or unusable
        (an artifact from before it was recorded: the judges learn from the stream)."""
        if not isinstance(data, Mapping):
            return None
        try:
            means, cvs, hourly = data["mean_abs"], data["block_cv"], data["hourly_mean_abs"]
            block_s = float(data["block_s"])
            if not (len(means) == len(cvs) == len(hourly) == n_channels) or not block_s > 0:
                return None
            incumbent = data.get("incumbent_mean_abs")
            if incumbent is not None and len(incumbent) != n_channels:
                incumbent = None
            priors = []
            for c, (mean, cv, hours) in enumerate(zip(means, cvs, hourly, strict=True)):
                if len(hours) != HOURS or not (math.isfinite(mean) and mean > 0):
                    return None
                other = None if incumbent is None else float(incumbent[c])
                priors.append(ResidualPrior(
                    float(mean),
                    tuple(None if h is None or not (math.isfinite(h) and h > 0) else float(h) for h in hours),
                    None if cv is None or not (math.isfinite(cv) and cv > 0) else float(cv),
                    block_s,
                    float(mean) / other if other is not None and math.isfinite(other) and other > 0 else None,
                ))  # fmt: skip
            return priors
        except (KeyError, TypeError, ValueError):
            return None

    def typical(self, t: float) -> float | None:
        """The typical |residual| at t's hour of day (UTC); None where the prior does not cover it."""
        return self.hourly[int((t % 86400.0) // 3600.0)]

    def covered(self, hour: int) -> bool:
        return self.hourly[hour] is not None


__all__ = ["ResidualPrior", "ValidationResiduals", "validation_residuals"]
