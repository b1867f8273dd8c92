"""Baselines a user gets for free: persistence, seasonal naive, ridge autoregression."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_daemon.baselines import (
    MODEL,
    Persistence,
    RidgeAR,
    SeasonalNaive,
    baselines_from_dict,
    detect_season,
    fit_ridge,
    held_out_report,
    make_baselines,
    one_step_errors,
)


def _ar2(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2): x_t = 1.6 x_{t-1} - 0.8 x_{t-2} + noise (a damped oscillation), and a noisy copy of it."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    for t in range(2, n):
        x[t] = 1.6 * x[t - 1] - 0.8 * x[t - 2] + rng.normal(0, 0.1)
    return np.stack([x, x + rng.normal(0, 0.05, n)], axis=1)


def _windows(series: np.ndarray, length: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(series, length, axis=0).transpose(0, 2, 1).copy()


def test_ridge_learns_an_autoregression_and_beats_persistence() -> None:
    series = _ar2(6000)
    windows = _windows(series, 17)
    train, val = windows[:4000], windows[4000:]
    ridge = fit_ridge(train, lags=8)
    assert ridge is not None and ridge.coef.shape == (8 * 2 + 1, 2)
    errors = one_step_errors([Persistence(), ridge], val)
    mse = {name: float(np.mean(e[:, 0] ** 2)) for name, e in errors.items()}
    # The noise floor is 0.1^2 = 0.01: ridge reaches it, persistence is about three times worse.
    assert mse["ridge"] < 0.0115 and mse["persistence"] > 2.5 * mse["ridge"], mse
    # Its live form gives the same forecasts as the batch form.
    live = np.stack([ridge.predict(w[:-1]) for w in val[:50]])
    np.testing.assert_allclose(live - val[:50, -1], errors["ridge"][:50], atol=1e-10)


def test_ridge_needs_enough_windows_and_falls_back_to_persistence_without_history() -> None:
    assert fit_ridge(_windows(_ar2(40), 17), lags=8) is None  # 24 windows for 17 coefficients
    ridge = RidgeAR(4, np.ones((4 * 2 + 1, 2)), 1.0)
    history = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(ridge.predict(history), [3.0, 4.0])


def test_seasonal_naive_and_detected_season() -> None:
    t = np.arange(3000)
    rng = np.random.default_rng(1)
    series = np.stack([np.sin(2 * np.pi * t / 96), np.cos(2 * np.pi * t / 96)], axis=1) + rng.normal(0, 0.05, (3000, 2))
    assert detect_season(series, max_lag=500) == 96
    series[100:130, 0] = np.nan  # gaps do not hide it
    assert detect_season(series, max_lag=500) == 96
    assert detect_season(np.cumsum(rng.normal(size=(3000, 2)), axis=0), max_lag=500) is None  # a random walk has none
    assert detect_season(series[:100], max_lag=500) is None  # shorter than three seasons
    seasonal = SeasonalNaive(96)
    np.testing.assert_array_equal(seasonal.predict(series[:200]), series[200 - 96])
    np.testing.assert_array_equal(seasonal.predict(series[:50]), series[49])  # persistence until a season is buffered


def test_held_out_report_serves_the_lowest_error_and_leaves_out_what_windows_cannot_judge() -> None:
    windows = _windows(_ar2(3000), 33)
    baselines = make_baselines(windows[:2000], season=96, lags=8)
    assert [b.name for b in baselines] == ["persistence", "seasonal_naive", "ridge"]
    perfect = np.zeros((1000, 2))
    report = held_out_report(baselines, windows[2000:], perfect)
    assert report["serve"] == MODEL and "seasonal_naive" not in report["mae"]  # a 96-step season in 32-step windows
    report = held_out_report(baselines, windows[2000:], np.ones((1000, 2)))
    assert report["serve"] == "ridge" and report["mae"][MODEL] == 1.0 and report["mse"][MODEL] == 1.0
    assert len(report["rms"]["ridge"]) == 2


def test_baselines_round_trip_through_json() -> None:
    baselines = make_baselines(_windows(_ar2(2000), 17), season=24, lags=4)
    again = baselines_from_dict(json.loads(json.dumps([b.to_dict() for b in baselines])))
    history = _ar2(100, seed=3)
    for a, b in zip(baselines, again, strict=True):
        np.testing.assert_allclose(a.predict(history), b.predict(history))
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines_from_dict([{"kind": "oracle"}])


def test_baselines_forecast_further_horizons() -> None:
    history = np.arange(40, dtype=np.float64)[:, None] * [1.0, -1.0]  # (40, 2), the newest last
    assert Persistence().predict_ahead(history, 5).tolist() == [39.0, -39.0]
    seasonal = SeasonalNaive(12)
    # 5 steps ahead is step 44; a season before it is 32. 30 ahead is 69; three seasons before: 33.
    assert seasonal.predict_ahead(history, 5)[0] == 32.0 and seasonal.predict_ahead(history, 30)[0] == 33.0
    assert seasonal.predict_ahead(history, 1)[0] == seasonal.predict(history)[0]
    series = _ar2(4000)
    ridge = fit_ridge(_windows(series, 33), lags=8, horizons=(1, 6, 30))
    assert ridge is not None and set(ridge.ahead) == {6}  # 8 lags + 30 ahead do not fit in 33 steps
    assert ridge.predict_ahead(series[:100], 30) is None
    again = baselines_from_dict(json.loads(json.dumps([ridge.to_dict()])))[0]
    np.testing.assert_allclose(again.predict_ahead(series[:100], 6), ridge.predict_ahead(series[:100], 6))
    # The direct 6-step fit beats persistence 6 steps ahead on the process it was fitted on.
    test = _windows(_ar2(2000, seed=5), 33)
    errors = [(ridge.predict_ahead(w[:-6], 6) - w[-1], w[-7] - w[-1]) for w in test[:500]]
    ridge_mae, persistence_mae = (np.mean([np.abs(e[i]).mean() for e in errors]) for i in (0, 1))
    assert ridge_mae < 0.8 * persistence_mae, (ridge_mae, persistence_mae)


def test_the_ridge_fit_holds_a_chunk_of_features_not_every_windows() -> None:
    """4,400 windows of 16 lags x 3 channels: every window's features in float64 are 1.7 MB and the
    windows' float64 copy 1.8 MB more (4.9 MB at the peak, measured, when formed at once); summed
    chunk by chunk the fit stays under 1.5 MB (0.85 MB measured) and matches the normal
    equations solved on all rows at once."""
    import tracemalloc

    from edge_daemon.baselines import RIDGE_CHUNK_ROWS, _features, fit_ridge

    rng = np.random.default_rng(0)
    windows = rng.normal(size=(4400, 17, 3)).cumsum(axis=1).astype(np.float32)
    tracemalloc.start()
    try:
        ridge = fit_ridge(windows, lags=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ridge is not None and len(windows) > 4 * RIDGE_CHUNK_ROWS
    assert peak < 1.5 * 2**20, f"{peak / 2**20:.2f} MB"
    wide = windows.astype(np.float64)
    x = _features(wide[:, :16])
    y = wide[:, -1] - wide[:, 15]
    gram = x.T @ x + ridge.penalty * len(x) * np.eye(x.shape[1])
    gram[-1, -1] -= ridge.penalty * len(x)
    np.testing.assert_allclose(ridge.coef, np.linalg.solve(gram, x.T @ y), rtol=1e-9, atol=1e-12)
