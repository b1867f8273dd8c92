"""What a user gets for free: persistence, seasonal naive and a ridge autoregression.

Each forecasts the next grid step from the normalised history (oldest first,
shape (T, S): the forecast channels first, then any input-only ones) with numpy
alone, in microseconds; the first C values of a forecast are the forecast
channels' (persistence and seasonal naive repeat every column). They are the yardstick the
served model must beat, and what the daemon serves while it does not
(`scoring.serving.Scorer`). The ridge model predicts the change from the last value
from the last `lags` steps of every channel, so heavy shrinkage falls back to
persistence; it is fitted in closed form on the same windows the model trains
on, at pretraining and again with every update. Everything round-trips
through JSON (`to_dict` / `baselines_from_dict`) inside the base's and each
adapter's meta.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NotRequired, TypedDict

import numpy as np

PERSISTENCE = "persistence"
SEASONAL = "seasonal_naive"
RIDGE = "ridge"
MODEL = "model"

RIDGE_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # per row; the best on held-out rows is kept
MAX_RIDGE_ROWS = 50_000  # enough for lags x channels coefficients
RIDGE_CHUNK_ROWS = 512  # windows whose features the ridge fit forms at a time


class BaselineJson(TypedDict):
    """A baseline in the base's and an adapter's meta (`to_dict`): the kind, and what it needs."""

    kind: Literal["persistence", "seasonal_naive", "ridge"]
    season: NotRequired[int]  # seasonal_naive's
    lags: NotRequired[int]  # ridge's, with penalty, coef and ahead
    penalty: NotRequired[float]
    coef: NotRequired[list[list[float]]]  # (lags * S + 1, C)
    ahead: NotRequired[dict[str, list[list[float]]]]  # steps ahead (as a string: a JSON key) -> coef


class HeldOut(TypedDict):
    """`held_out_report`: the model and each baseline on held-out windows, and which to serve."""

    mae: dict[str, float]  # name ("model" or a baseline's) -> one-step MAE
    mse: dict[str, float]
    rms: dict[str, list[float]]  # name -> per-channel RMS error
    serve: str  # the lowest MAE
    windows: int


class Persistence:
    name = PERSISTENCE
    history_steps = 1

    def predict(self, history: np.ndarray) -> np.ndarray:
        return history[-1]

    def predict_ahead(self, history: np.ndarray, steps: int) -> np.ndarray | None:
        return history[-1]

    def to_dict(self) -> BaselineJson:
        return {"kind": PERSISTENCE}


@dataclass
class SeasonalNaive:
    """The value one season ago; persistence until a whole season is buffered."""

    season: int
    name: str = field(default=SEASONAL, init=False)

    @property
    def history_steps(self) -> int:
        return self.season

    def predict(self, history: np.ndarray) -> np.ndarray:
        # The step being forecast lies one step after history[-1]; a season before it is history[-season].
        return self.predict_ahead(history, 1)

    def predict_ahead(self, history: np.ndarray, steps: int) -> np.ndarray | None:
        """The value whole seasons before the step `steps` ahead (at most a season back in history)."""
        back = self.season * math.ceil(steps / self.season) - steps + 1  # rows back from the newest
        return history[-back] if len(history) >= back else history[-1]

    def to_dict(self) -> BaselineJson:
        return {"kind": SEASONAL, "season": self.season}


@dataclass
class RidgeAR:
    """next - last = [last, history[-k] - last for k in 2..lags, 1] @ coef over every channel (the
    input-only ones too), for the C forecast channels (the first C columns);
    the value `h` steps ahead the same way with `ahead[h]`, a direct fit of its own."""

    lags: int
    coef: np.ndarray  # (lags * S + 1, C)
    penalty: float
    ahead: dict[int, np.ndarray] = field(default_factory=dict)  # steps -> (lags * S + 1, C)
    name: str = field(default=RIDGE, init=False)

    @property
    def history_steps(self) -> int:
        return self.lags

    def predict(self, history: np.ndarray) -> np.ndarray:
        return self.predict_ahead(history, 1)  # type: ignore[return-value]  # the next step is always fitted

    def predict_ahead(self, history: np.ndarray, steps: int) -> np.ndarray | None:
        coef = self.coef if steps == 1 else self.ahead.get(steps)
        if coef is None:
            return None
        outputs = coef.shape[1]
        if len(history) < self.lags:
            return history[-1, :outputs]
        return history[-1, :outputs] + _features(history[None, -self.lags :])[0] @ coef

    def to_dict(self) -> BaselineJson:
        return {
            "kind": RIDGE, "lags": self.lags, "penalty": self.penalty, "coef": self.coef.tolist(),
            "ahead": {str(h): c.tolist() for h, c in self.ahead.items()},
        }  # fmt: skip


Baseline = Persistence | SeasonalNaive | RidgeAR


def _features(histories: np.ndarray) -> np.ndarray:
    """(N, lags, C) -> (N, lags * C + 1): the last value, the earlier ones relative to it, a constant."""
    last = histories[:, -1]  # (N, C)
    relative = histories[:, :-1] - last[:, None]  # (N, lags - 1, C)
    n = histories.shape[0]
    return np.concatenate([last, relative.reshape(n, -1), np.ones((n, 1))], axis=1)


def fit_ridge(
    windows: np.ndarray,
    lags: int,
    rng: np.random.Generator | None = None,
    horizons: tuple[int, ...] = (1,),
    outputs: int | None = None,
) -> RidgeAR | None:
    """Fit the first `outputs` channels (default all) of the last step of each (N, L, S) window
    from the `lags` steps of all S before it; None if too few windows.
    Each further horizon h gets a direct fit of its own: the last step from the `lags` ending h
    steps before it (horizons the windows are too short for are left out).

    The penalty is chosen on the newest fifth of the windows (time order), then
    the coefficients are refitted on all of them.
    """
    n, length, channels = np.shape(windows)
    outputs = channels if outputs is None else outputs
    lags = min(lags, length - 1)
    if n < 4 * (lags * channels + 1) or lags < 1:
        return None
    coef, penalty = _fit_ahead(windows, lags, 1, rng, outputs)
    ahead = {h: _fit_ahead(windows, lags, h, rng, outputs)[0] for h in horizons if h > 1 and lags + h <= length}
    return RidgeAR(lags, coef, penalty, ahead)


def _fit_ahead(
    windows: np.ndarray, lags: int, steps: int, rng: np.random.Generator | None, outputs: int
) -> tuple[np.ndarray, float]:
    """Coefficients and penalty of the change of the first `outputs` channels from a window's
    step -1 - steps to its last step.

    The fit sums the normal equations over RIDGE_CHUNK_ROWS windows at a time: it holds (lags x
    channels)^2 sums and one chunk's features, never every window's (on a device's update, ~4
    MB of features in float64 against ~0.2 MB).
    """
    windows = np.asarray(windows)
    n = len(windows)
    rows = np.arange(n)
    if n > MAX_RIDGE_ROWS:
        rows, n = np.sort((rng or np.random.default_rng(0)).choice(n, MAX_RIDGE_ROWS, replace=False)), MAX_RIDGE_ROWS
    split = int(n * 0.8)

    def chunks(first: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for at in range(first, stop, RIDGE_CHUNK_ROWS):
            chunk = np.asarray(windows[rows[at : min(stop, at + RIDGE_CHUNK_ROWS)], -steps - lags :], dtype=np.float64)  # only what the fit reads
            yield _features(chunk[:, :lags]), chunk[:, -1, :outputs] - chunk[:, lags - 1, :outputs]

    def sums(first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        width = lags * windows.shape[2] + 1
        gram, cross = np.zeros((width, width)), np.zeros((width, outputs))
        for x, y in chunks(first, stop):
            gram += x.T @ x
            cross += x.T @ y
        return gram, cross

    def solve(gram: np.ndarray, cross: np.ndarray, count: int, penalty: float) -> np.ndarray:
        gram = gram + penalty * count * np.eye(len(gram))
        gram[-1, -1] -= penalty * count  # the constant is not shrunk
        return np.linalg.solve(gram, cross)

    fit_gram, fit_cross = sums(0, split)
    coefs = {p: solve(fit_gram, fit_cross, split, p) for p in RIDGE_PENALTIES}
    squared = dict.fromkeys(RIDGE_PENALTIES, 0.0)
    for x, y in chunks(split, n):
        for p, coef in coefs.items():
            squared[p] += float(((x @ coef - y) ** 2).sum())
    penalty = min(squared, key=squared.__getitem__)
    val_gram, val_cross = sums(split, n)
    return solve(fit_gram + val_gram, fit_cross + val_cross, n, penalty), penalty


def detect_season(values: np.ndarray, max_lag: int, min_lag: int = 4, threshold: float = 0.3) -> int | None:
    """The lag of the strongest autocorrelation peak in [min_lag, max_lag], averaged over channels.

    `values` is (n, C), NaN where unknown. None when no peak reaches `threshold`
    or the series is shorter than three seasons.
    """
    # The newest 20 seasons at most: enough to see a season, and the FFT stays small on a long history.
    values = np.asarray(values[-20 * max_lag :], dtype=np.float64)
    n = len(values)
    max_lag = min(max_lag, n // 3)
    if max_lag <= min_lag:
        return None
    centred = values - np.nanmean(values, axis=0)
    centred = np.nan_to_num(centred)
    size = 1 << math.ceil(math.log2(2 * n))
    spectrum = np.fft.rfft(centred, size, axis=0)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size, axis=0)[: max_lag + 1]
    variance = acf[0]
    usable = variance > 0
    if not usable.any():
        return None
    acf = (acf[:, usable] / variance[usable]).mean(axis=1) * n / (n - np.arange(max_lag + 1))  # unbiased
    lags = np.arange(min_lag, max_lag + 1)
    # A peak: higher than both neighbours (a slowly decaying ACF has none, so it is not a season).
    peaks = [k for k in lags if k + 1 <= max_lag and acf[k] >= acf[k - 1] and acf[k] >= acf[k + 1]]
    if not peaks:
        return None
    # Multiples of a season correlate as well as the season itself: take the shortest near the best.
    strongest = max(acf[k] for k in peaks)
    if strongest < threshold:
        return None
    return int(next(k for k in peaks if acf[k] >= 0.9 * strongest))


def baselines_from_dict(items: list[BaselineJson]) -> list[Baseline]:
    made: list[Baseline] = []
    for item in items:
        kind = item.get("kind")
        if kind == PERSISTENCE:
            made.append(Persistence())
        elif kind == SEASONAL:
            made.append(SeasonalNaive(int(item["season"])))
        elif kind == RIDGE:
            ahead = {int(h): np.asarray(c, dtype=np.float64) for h, c in (item.get("ahead") or {}).items()}
            made.append(RidgeAR(int(item["lags"]), np.asarray(item["coef"], dtype=np.float64), float(item["penalty"]), ahead))
        else:
            raise ValueError(f"unknown baseline kind {kind!r}")
    return made


def make_baselines(
    train_windows: np.ndarray, season: int | None, lags: int, horizons: tuple[int, ...] = (1,), outputs: int | None = None
) -> list[Baseline]:
    """Persistence, seasonal naive (when there is a season) and ridge (when there are enough windows),
    each forecasting every one of `horizons` steps ahead of the first `outputs` channels (default all)
    of (N, L, S) windows."""
    made: list[Baseline] = [Persistence()]
    if season:
        made.append(SeasonalNaive(int(season)))
    ridge = fit_ridge(train_windows, lags, horizons=horizons, outputs=outputs)
    if ridge is not None:
        made.append(ridge)
    return made


def one_step_errors(baselines: list[Baseline], windows: np.ndarray, outputs: int | None = None) -> dict[str, np.ndarray]:
    """(N, C) errors (forecast - actual) of each baseline on the first `outputs` channels (default
    all) of the last step of (N, L, S) windows.

    A baseline that needs more history than the windows hold (seasonal naive
    with a season longer than a window) is left out: it is judged on the live
    stream instead, where the scorer buffers whole seasons.
    """
    needed = max((b.history_steps for b in baselines), default=1)
    windows = np.asarray(windows)
    windows = np.asarray(windows[:, -1 - min(needed, windows.shape[1] - 1) :], dtype=np.float64)  # only what is read
    outputs = windows.shape[2] if outputs is None else outputs
    history, actual = windows[:, :-1], windows[:, -1, :outputs]
    out: dict[str, np.ndarray] = {}
    for b in baselines:
        if b.history_steps > history.shape[1]:
            continue
        if isinstance(b, RidgeAR):
            forecast = history[:, -1, :outputs] + _features(history[:, -b.lags :]) @ b.coef
        elif isinstance(b, SeasonalNaive):
            forecast = history[:, -b.season, :outputs]
        else:
            forecast = history[:, -1, :outputs]
        out[b.name] = forecast - actual
    return out


def held_out_report(
    baselines: list[Baseline], windows: np.ndarray, model_errors: np.ndarray | None, outputs: int | None = None
) -> HeldOut:
    """One-step MAE, MSE and per-channel RMS error of the model and each baseline on the first
    `outputs` channels (default all) of held-out (N, L, S) windows, and which of them to serve:
    the lowest MAE, the measure the live serving rule uses."""
    errors = one_step_errors(baselines, windows, outputs)
    if model_errors is not None:
        errors = {MODEL: np.asarray(model_errors, dtype=np.float64), **errors}
    mae = {name: float(np.mean(np.abs(e))) for name, e in errors.items()}
    return {
        "mae": mae,
        "mse": {name: float(np.mean(e**2)) for name, e in errors.items()},
        "rms": {name: np.sqrt(np.mean(e**2, axis=0)).tolist() for name, e in errors.items()},
        "serve": min(mae, key=mae.__getitem__),
        "windows": int(len(windows)),
    }
