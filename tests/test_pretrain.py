"""Base-model training from a grid, windows, a CSV (wide or long) and the replay store."""

from __future__ import annotations

import csv
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHANNELS, make_config
from edge_daemon.artifacts.base import load_base
from edge_daemon.config import ModelConfig, StoreConfig
from edge_daemon.training.csv_readings import read_csv_readings
from edge_daemon.errors import TrainingAborted, TrainingError
from edge_daemon.frames import Grid, NormStats, build_grid, make_windows
from edge_daemon.training.pretrain import (
    count_windows,
    pretrain,
    pretrain_from_config,
    pretrain_from_csv,
    pretrain_from_store,
)

torch.set_num_threads(1)

TINY = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
T0 = 1_700_000_000.0


def _values(n: int, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    clean = np.stack(
        [20 + 3 * np.sin(2 * np.pi * t / 40), 1 + 0.5 * np.cos(2 * np.pi * t / 25), 5 + np.sin(2 * np.pi * t / 90)], axis=1
    )
    return (clean + rng.normal(0, 0.05, clean.shape)).astype(np.float32)


def test_pretrain_learns_and_saves(tmp_path: Path) -> None:
    values = _values(2500)
    values[1000:1030] = np.nan  # an outage: windows must not span it
    grid = Grid(T0, 1.0, values)
    metrics = pretrain(grid, CHANNELS, 1.0, TINY, tmp_path / "base", steps=250, lr=1e-2, progress=True)
    # It beats "next = current" by a wide margin, so it learned the dynamics.
    assert metrics["val_loss"] < 0.5 * metrics["persistence_val_loss"]
    assert metrics["steps"] == 250 and 0 < metrics["best_step"] <= 250
    expected_windows = len(make_windows(grid, 17).windows)
    # The newest 10% is held out; the 16 windows straddling the split are dropped.
    assert metrics["val_windows"] == math.ceil(expected_windows * 0.1)
    assert metrics["train_windows"] == expected_windows - metrics["val_windows"] - 16

    base = load_base(tmp_path / "base", channels=CHANNELS, period_s=1.0)
    assert base.meta["steps"] == 250 and base.meta["val_loss"] == metrics["val_loss"]
    assert base.meta["data_end"] == T0 + 2499
    np.testing.assert_allclose(base.residual_scale, metrics["residual_scale"])
    # The residual scale is the typical last-step residual: a little above the noise, well below the signal.
    assert (base.residual_scale > 0.01).all() and (base.residual_scale < 0.5).all()
    fitted = NormStats.fit(values)
    np.testing.assert_allclose(base.norm.mean, fitted.mean)
    np.testing.assert_allclose(base.norm.std, fitted.std)


def test_pretraining_starts_from_the_ridge_fit(tmp_path: Path) -> None:
    """One tiny step: the base forecasts as well as the ridge baseline fitted on the same windows,
    far better than persistence (a model starting from scratch would be persistence here)."""
    metrics = pretrain(Grid(T0, 1.0, _values(2500)), CHANNELS, 1.0, TINY, tmp_path / "base", steps=1, lr=1e-6)
    mae = metrics["held_out"]["mae"]
    assert mae["model"] <= 1.01 * mae["ridge"] and mae["ridge"] < 0.7 * mae["persistence"]
    assert metrics["best_step"] in (0, 1)


def test_further_horizons_start_from_their_ridge_fits_and_train_as_asked(tmp_path: Path) -> None:
    """8 lags and 8 steps ahead fit in a 17-step window: the 8-step path starts from its own ridge fit."""
    config = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, ridge_lags=8)
    metrics = pretrain(Grid(T0, 1.0, _values(2500)), CHANNELS, 1.0, config, tmp_path / "base", steps=40, lr=1e-6)
    assert metrics["steps"] == 40 and metrics["horizons"] == [1, 8]
    ridge = next(b for b in metrics["baselines"] if b["kind"] == "ridge")
    assert list(ridge["ahead"]) == ["8"]
    base = load_base(tmp_path / "base")
    np.testing.assert_allclose(base.model.far_linear[0].bias.detach().numpy(), ridge["ahead"]["8"][-1], atol=1e-4)


def test_pretrain_from_windows_and_epochs(tmp_path: Path) -> None:
    raw = make_windows(Grid(0.0, 1.0, _values(600)), 17)
    metrics = pretrain(raw.windows, CHANNELS, 1.0, TINY, tmp_path / "base", epochs=0.5, batch_size=16)
    assert metrics["steps"] == math.ceil(0.5 * metrics["train_windows"] / 16)
    assert load_base(tmp_path / "base").cfg.window == 16


def test_not_enough_data_and_stop_save_nothing(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not enough data"):
        pretrain(Grid(0.0, 1.0, _values(40)), CHANNELS, 1.0, TINY, tmp_path / "base", steps=5)
    calls = []

    def stop_on_third_poll() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TrainingAborted):
        pretrain(Grid(0.0, 1.0, _values(500)), CHANNELS, 1.0, TINY, tmp_path / "base", steps=50, should_stop=stop_on_third_poll)
    assert len(calls) == 3
    assert not (tmp_path / "base").exists()
    with pytest.raises(TrainingError, match="period"):
        pretrain(Grid(0.0, 2.0, _values(500)), CHANNELS, 1.0, TINY, tmp_path / "base", steps=5)


def _readings(n: int, seed: int = 0) -> list[tuple[str, float, float]]:
    values = _values(n, seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        for c, name in enumerate(CHANNELS):
            if rng.random() < 0.05:
                continue
            out.append((name, T0 + i, float(values[i, c])))
    return out


def test_csv_wide_and_long_read_the_same(tmp_path: Path) -> None:
    readings = _readings(300)
    long_path, wide_path = tmp_path / "long.csv", tmp_path / "wide.csv"
    with open(long_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ts", "channel", "value"])
        for name, ts, value in readings:
            # ISO 8601 and unix seconds are both accepted.
            stamp = datetime.fromtimestamp(ts, UTC).isoformat() if ts % 2 else repr(ts)
            writer.writerow([stamp, name, repr(value)])
        writer.writerow([repr(T0), "m9/unknown", "1.0"])
    rows: dict[float, dict[str, float]] = {}
    for name, ts, value in readings:
        rows.setdefault(ts, {})[name] = value
    with open(wide_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ts", "m1/extra", *reversed(CHANNELS)])  # column order need not match the config
        for ts, cells in rows.items():
            writer.writerow([repr(ts), "0", *(repr(cells[c]) if c in cells else "" for c in reversed(CHANNELS))])

    def canonical(arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        stacked = np.stack([arrays[0], arrays[1].astype(float), arrays[2]], axis=1)
        return stacked[np.lexsort((stacked[:, 1], stacked[:, 0]))]

    from_long = read_csv_readings(long_path, CHANNELS)
    from_wide = read_csv_readings(wide_path, CHANNELS)
    assert len(from_long[0]) == len(readings)
    np.testing.assert_allclose(canonical(from_long), canonical(from_wide), rtol=0, atol=1e-6)

    missing = tmp_path / "missing.csv"
    missing.write_text("ts,m1/temperature\n1,2\n")
    with pytest.raises(TrainingError, match="no column"):
        read_csv_readings(missing, CHANNELS)
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("when,channel,value\n")
    with pytest.raises(TrainingError, match="first column"):
        read_csv_readings(bad_header, CHANNELS)

    metrics = pretrain_from_csv(wide_path, CHANNELS, 1.0, 5, TINY, tmp_path / "base", steps=10)
    assert load_base(tmp_path / "base").meta["source"] == "csv:wide.csv"
    assert metrics["train_windows"] > 16


def test_pretrain_from_store(tmp_path: Path) -> None:
    from edge_daemon.store import Reading, ReplayStore

    now = time.time()
    readings = [Reading(name, now - 600 + (ts - T0), value) for name, ts, value in _readings(600, seed=3)]
    with ReplayStore(tmp_path / "store.db", StoreConfig(), CHANNELS) as store:
        store.write(readings)
        ts, ch, vals = store.read()
        grid = build_grid(ts, ch, vals, 3, 1.0, 5)
        available = count_windows(grid, 17)
        assert available > 500
        with pytest.raises(TrainingError, match="not enough data in the store"):
            pretrain_from_store(store, CHANNELS, 1.0, 5, TINY, tmp_path / "base", min_windows=available + 1)
        assert not (tmp_path / "base").exists()
        metrics = pretrain_from_store(store, CHANNELS, 1.0, 5, TINY, tmp_path / "base", min_windows=available, steps=10)
    assert metrics["train_windows"] + metrics["val_windows"] + 16 == available
    assert load_base(tmp_path / "base").meta["source"] == "store"


def test_pretrain_from_config_csv(tmp_path: Path) -> None:
    config = make_config(tmp_path, model={"window": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "pretrain_steps": 7})
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ts", "channel", "value"])
        writer.writerows((repr(ts), name, repr(value)) for name, ts, value in _readings(200))
    metrics = pretrain_from_config(config, csv_path=path)
    assert metrics["steps"] == 7
    assert load_base(config.base_dir, channels=config.channels.names).cfg.d_model == 16


@pytest.mark.slow
def test_default_model_on_20k_steps_is_useful(tmp_path: Path) -> None:
    """The default size, its default steps, on ~20k grid steps: it learns the dynamics.

    How long that takes (a minute on an idle 2-core device) depends on the machine, so it is
    not asserted here.
    """
    metrics = pretrain(Grid(T0, 1.0, _values(20_000)), CHANNELS, 1.0, ModelConfig(), tmp_path / "base")
    assert metrics["val_loss"] < 0.5 * metrics["persistence_val_loss"]


def _office_load(days: int, period_s: float, seed: int = 0) -> Grid:
    """An office's HVAC load: switched on at 08:00 and off at 18:00 to a level that varies by day."""
    rng = np.random.default_rng(seed)
    steps_per_day = int(86400 / period_s)
    t = np.arange(days * steps_per_day) * period_s
    on = ((t % 86400) >= 8 * 3600) & ((t % 86400) < 18 * 3600)
    level = np.repeat(rng.uniform(0.5, 1.0, days), steps_per_day)
    values = on * level + rng.normal(0, 0.02, len(t))
    return Grid(T0 - T0 % 86400, period_s, values[:, None].astype(np.float32))


def test_calendar_inputs_are_used_only_where_the_data_spans_two_cycles(tmp_path: Path) -> None:
    config = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, calendar=["day", "week"])
    short = pretrain(_office_load(1, 900.0), ["hvac/load"], 900.0, config, tmp_path / "short", steps=1)
    assert short["calendar_s"] == []
    month = pretrain(_office_load(30, 900.0), ["hvac/load"], 900.0, config, tmp_path / "month", steps=1)
    assert month["calendar_s"] == [86400.0, 604800.0]
    base = load_base(tmp_path / "month")
    assert base.cfg.calendar_s == (86400.0, 604800.0) and base.cfg.n_inputs == 5


@pytest.mark.slow  # trains two base models on days of data (about 20 s)
def test_calendar_inputs_let_the_model_forecast_what_follows_the_clock(tmp_path: Path) -> None:
    """A load switched by a timer: no history tells when it switches, the time of day does. With the
    time of day as an input the base beats the ridge baseline by far; without it, it cannot.

    Whether a run leaves the plateau where it forecasts like persistence within its 800 steps turns
    on rounding: the same seed learns the switch with torch's AVX2 kernels and stays stuck with its
    AVX-512 ones (measured: model/ridge MAE 0.48 against 0.88). One seed in three or four stays
    stuck on either, so the claim is for the best of three seeds, as a user retraining would find."""
    grid = _office_load(40, 900.0)
    errors: dict[str, float] = {}
    for name, calendar, seeds in (("with", ["day"], (0, 1, 2)), ("without", [], (0,))):
        config = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, calendar=calendar, horizons=[1])
        for seed in seeds:
            mae = pretrain(grid, ["hvac/load"], 900.0, config, tmp_path / f"{name}-{seed}", steps=800, lr=5e-3, seed=seed)["held_out"]["mae"]
            errors[name] = min(errors.get(name, math.inf), mae["model"] / mae["ridge"])
    assert errors["with"] < 0.7 * errors["without"], errors


def test_last_step_errors_forecast_as_many_windows_at_a_time_as_asked() -> None:
    """A training worker forecasts its held-out windows with its plan's micro-batch: on the large
    model's 256-step window a batch of 32 held ~120 MB, more than the whole update's plan."""
    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.pretrain import last_step_errors

    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=16, d_model=16, n_heads=2, n_layers=1, d_ff=16, lags=4))
    windows = np.random.default_rng(0).normal(size=(7, 17, 3)).astype(np.float32)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
    errors = last_step_errors(model, windows, batch_size=2)
    assert seen == [2, 2, 2, 1]
    np.testing.assert_allclose(errors, last_step_errors(model, windows), rtol=1e-5, atol=1e-6)
