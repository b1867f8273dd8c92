"""Residual drift judged from the first hour: the judges start from what the model's held-out
validation residuals say is normal (drift/prior.py), stored with the base and each adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.artifacts.base import CONFIG_FILE, load_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.config import DriftConfig, ModelConfig
from edge_daemon.drift import DriftMonitor
from edge_daemon.drift.feed import base_residual_prior
from edge_daemon.drift.prior import ResidualPrior, validation_residuals
from edge_daemon.frames import build_grid
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.scoring.serving import Scorer
from edge_daemon.training.pretrain import pretrain
from edge_daemon.training.records import AdapterMeta
from sample_sensors.generate import CHANNELS, DEFAULT_START_TS, generate_labeled, readings
from tests.conftest import make_config

T0 = DEFAULT_START_TS  # midnight UTC
HOUR = 3600
SIZE = np.array([0.05, 0.08, 0.06])  # typical |residual| scale per channel


def residuals(steps: int, seed: int) -> np.ndarray:
    """(steps, 3) heavy-tailed residuals of a steady size, one a second."""
    return np.random.default_rng(seed).standard_t(4, (steps, 3)) * SIZE


def prior_of(seed: int = 99) -> list[ResidualPrior]:
    """What held-out windows (the last two hours of the day before) and a sample of training
    windows (every hour) of the same model say is normal."""
    held_out = residuals(2 * HOUR, seed)
    train = residuals(24 * 200, seed + 1) * 0.9  # a model fits its training data a little better
    summary = validation_residuals(
        held_out, T0 - 2 * HOUR + np.arange(2 * HOUR, dtype=float),
        train_errors=train, train_end_times=T0 - 86400 + np.repeat(np.arange(24), 200) * HOUR + 1800.0,
    )  # fmt: skip
    priors = ResidualPrior.from_json(json.loads(json.dumps(summary)), 3)
    assert priors is not None
    return priors


def events_of(monitor: DriftMonitor, stream: np.ndarray, t0: float) -> list[tuple[int, str]]:
    events = []
    for k in range(len(stream)):
        events += [(k, e.channel) for e in monitor.update_residuals(stream[k], t0 + k)]
    return events


def test_with_the_validation_prior_a_shift_in_the_first_hour_is_found_in_minutes() -> None:
    stream = residuals(HOUR, seed=1)
    shift = 20 * 60  # 00:20 of the first day after start-up
    stream[shift:, 2] *= 2.5  # the current's residuals jump (an overload)
    with_prior = DriftMonitor(list(CHANNELS), DriftConfig(), residual_prior=prior_of())
    status = with_prior.status()["channels"]["m1/current"]
    assert status["residual_window"]["baseline"] == "validation"
    assert status["residual_cusum"]["state"] == "validation"
    events = events_of(with_prior, stream, T0 + 7 * HOUR)
    assert [ch for _, ch in events] == ["m1/current"]
    assert 0 < events[0][0] - shift <= 10 * 60
    # Learning for a day (today's judges without a prior, or an old base): blind to it.
    learning = DriftMonitor(list(CHANNELS), DriftConfig())
    assert learning.status()["channels"]["m1/current"]["residual_window"]["baseline"] == "learning"
    assert events_of(learning, stream, T0 + 7 * HOUR) == []


def test_with_the_validation_prior_stationary_first_hours_raise_nothing() -> None:
    monitor = DriftMonitor(list(CHANNELS), DriftConfig(), residual_prior=prior_of())
    for seed in (2, 3):
        assert events_of(monitor, residuals(3 * HOUR, seed), T0 + (seed - 2) * 3 * HOUR) == [], f"seed {seed}"
    assert all(ch["residual_window"]["ratio"] < 1.5 for ch in monitor.status()["channels"].values())


def test_an_accepted_adapter_restarts_the_judges_from_its_validation_residuals() -> None:
    monitor = DriftMonitor(list(CHANNELS), DriftConfig(), residual_prior=prior_of())
    events_of(monitor, residuals(HOUR, seed=4), T0)
    # The adapter's held-out windows cover the last quarter hour; the other hours are scaled from
    # what the judges hold for them.
    held_out = residuals(900, seed=5) * 1.2
    adapter = ResidualPrior.from_json(validation_residuals(held_out, T0 + HOUR - 900 + np.arange(900.0)), 3)
    monitor.reset_baseline(T0 + HOUR, adapter)
    assert monitor.status()["channels"]["m1/vibration"]["residual_cusum"]["state"] == "validation"
    stream = residuals(HOUR, seed=6) * 1.2
    stream[1200:, 1] *= 2.5
    events = events_of(monitor, stream, T0 + 3 * HOUR)
    assert [ch for _, ch in events] == ["m1/vibration"] and events[0][0] - 1200 <= 10 * 60
    # An adapter without them (from before they were recorded): the CUSUM learns for an hour again.
    monitor.reset_baseline(T0 + 4 * HOUR, None)
    status = monitor.status()["channels"]["m1/vibration"]
    assert status["residual_cusum"]["state"] == "learning" and status["residual_window"]["baseline"] == "learning"


def test_an_adapter_validated_on_a_noisy_quarter_hour_is_judged_by_how_it_compares_with_the_incumbent() -> None:
    """An update's held-out windows are its newest minutes, say the line's start-up, when every
    model's residuals are twice the hour's usual. Scaling the other hours by that quarter hour
    over the whole hour would judge them as twice as noisy; compared with the incumbent on the
    same windows (as good), they are judged as before, and a shift at 07:00 is found."""
    monitor = DriftMonitor(list(CHANNELS), DriftConfig(), residual_prior=prior_of())
    events_of(monitor, residuals(HOUR, seed=8), T0 + 6 * HOUR)
    typical_before = monitor.residual_typical("m1/vibration", T0 + 7 * HOUR)
    assert typical_before is not None
    start_up = residuals(900, seed=9) * 2.0  # 06:45-07:00
    summary = validation_residuals(start_up, T0 + 7 * HOUR - 900 + np.arange(900.0))
    assert summary is not None
    summary["incumbent_mean_abs"] = [float(v) for v in np.mean(np.abs(start_up), axis=0)]  # the incumbent did as well there
    adapter = ResidualPrior.from_json(json.loads(json.dumps(summary)), 3)
    assert adapter is not None and adapter[1].incumbent_ratio == pytest.approx(1.0)
    monitor.reset_baseline(T0 + 7 * HOUR, adapter)
    assert monitor.residual_typical("m1/vibration", T0 + 7 * HOUR) == pytest.approx(typical_before)
    stream = residuals(HOUR, seed=10)
    stream[600:, 1] *= 2.5
    events = events_of(monitor, stream, T0 + 7 * HOUR)
    assert [ch for _, ch in events] == ["m1/vibration"] and events[0][0] - 600 <= 10 * 60, events
    # Without the incumbent's (an adapter from before it was recorded) the quarter hour's scale
    # doubles the typical |residual| of every hour, and the same shift goes unseen for longer.
    del summary["incumbent_mean_abs"]
    monitor.reset_baseline(T0 + 7 * HOUR, ResidualPrior.from_json(json.loads(json.dumps(summary)), 3))
    assert (monitor.residual_typical("m1/vibration", T0 + 7 * HOUR) or 0.0) > 1.5 * typical_before


def test_the_prior_is_saved_with_the_base_and_the_adapter_and_old_ones_fall_back(tmp_path: Path) -> None:
    steps = HOUR + 600
    data = generate_labeled(steps, seed=3)
    grid = build_grid(*readings(data, 0, steps), 3, 1.0, 5)
    model_cfg = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    pretrain(grid, list(CHANNELS), 1.0, model_cfg, tmp_path / "base", steps=5)
    base = load_base(tmp_path / "base", list(CHANNELS), 1.0)
    recorded = base.meta["validation_residuals"]
    assert recorded["windows"] == base.meta["val_windows"] and len(recorded["mean_abs"]) == 3
    # The held-out windows are the newest tenth (01:00-01:10); the training windows fill hour 0.
    assert all(h is not None for h in recorded["hourly_mean_abs"][0][:2]) and recorded["hourly_mean_abs"][0][7] is None
    assert base_residual_prior(base) is not None

    cfg = make_config(tmp_path)
    pipeline = ScoringPipeline(cfg, lambda *args: None, Scorer(base, serving_model(base, None), 6.0))
    assert {ch["residual_window"]["baseline"] for ch in pipeline.drift.status()["channels"].values()} == {"validation"}
    # An adapter's meta carries its own; read back from JSON, and one without them loads as before.
    meta = AdapterMeta.from_json(json.loads(json.dumps(AdapterMeta(validation_residuals=recorded).to_json())))
    assert meta.validation_residuals == recorded and AdapterMeta.from_json({}).validation_residuals is None
    pipeline.drift_signal.reset(T0, None)
    assert {ch["residual_window"]["baseline"] for ch in pipeline.drift.status()["channels"].values()} == {"learning"}
    pipeline.drift_signal.reset(T0, meta.validation_residuals)
    assert {ch["residual_window"]["baseline"] for ch in pipeline.drift.status()["channels"].values()} == {"validation"}

    # A base from before they were recorded loads and is judged from the stream, as before.
    config_path = tmp_path / "base" / CONFIG_FILE
    saved = json.loads(config_path.read_text())
    del saved["meta"]["validation_residuals"]
    config_path.write_text(json.dumps(saved))
    old = load_base(tmp_path / "base", list(CHANNELS), 1.0)
    assert base_residual_prior(old) is None
    pipeline = ScoringPipeline(cfg, lambda *args: None, Scorer(old, serving_model(old, None), 6.0))
    assert {ch["residual_window"]["baseline"] for ch in pipeline.drift.status()["channels"].values()} == {"learning"}


@pytest.mark.slow  # ~10 s alone (peft merges three adapters), more beside other work
def test_the_update_path_hands_the_served_adapters_validation_residuals_to_the_drift_judges(tmp_path: Path) -> None:
    """At start-up the judges start from the served adapter's; a rollback to one from before they
    were recorded learns from the stream (the base here recorded none either)."""
    from edge_daemon.adaptation.commands import handle_rollback
    from edge_daemon.artifacts.adapters import AdapterStore
    from tests.test_adaptation import _adaptation, _commit, _save_base

    config = make_config(tmp_path)
    _save_base(config.base_dir, seed=0)
    base = load_base(config.base_dir, config.channels.names, 1.0)
    held_out = validation_residuals(residuals(900, seed=7), T0 + np.arange(900.0))
    store = AdapterStore(config.adapters_dir)
    recorded = _commit(store, base.model, AdapterMeta(reason="requested", base_fingerprint=base.fingerprint, validation_residuals=held_out), seed=1)
    older = _commit(store, base.model, AdapterMeta(reason="requested", base_fingerprint=base.fingerprint), seed=2)
    store.make_current(recorded)

    pipeline = ScoringPipeline(config, lambda *args, **kwargs: None)
    adaptation = _adaptation(config, store, pipeline)
    adaptation.start()
    baselines = lambda: {ch["residual_window"]["baseline"] for ch in pipeline.drift.status()["channels"].values()}  # noqa: E731
    assert baselines() == {"validation"}
    handle_rollback(adaptation, {"cmd": "rollback", "version": older})
    assert baselines() == {"learning"}
    handle_rollback(adaptation, {"cmd": "rollback", "version": recorded})
    assert baselines() == {"validation"}
