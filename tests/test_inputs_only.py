"""Input-only channels: read by the model and the ridge baseline, never forecast, scored or judged for drift.

An HVAC zone: the set-point (an input only, listed first in the config) drives the
temperature a few steps later and the power draw at once. Only a forecaster that
reads the set-point can see a set-point change coming.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_daemon.artifacts.adapters import AdapterStore
from edge_daemon.artifacts.base import BaseModel, load_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.baselines import MODEL, PERSISTENCE, RIDGE, RidgeAR, fit_ridge
from edge_daemon.config import Config
from edge_daemon.errors import ConfigError, ModelError
from edge_daemon.frames import Grid, make_windows, normalise_grid
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.training.pretrain import pretrain_from_config
from edge_daemon.scoring.serving import Scorer, ServingRule
from edge_daemon.store import Reading, ReplayStore
from edge_daemon.training.records import UpdateJob
from edge_daemon.training.job import _run_update
from edge_daemon.training.governor import PlanGovernor
from edge_daemon.memory.pressure import Level
from edge_daemon.training.plan import plan_candidates
from tests.conftest import make_config

torch.set_num_threads(1)

SETPOINT, TEMPERATURE, POWER = "zone1/setpoint", "zone1/temperature", "zone1/power"
NAMES = [SETPOINT, TEMPERATURE, POWER]  # the input-only channel first: the model reorders its columns
START_TS = 1.7e9
STEPS = 3000


def zone(n: int, seed: int, gain: float = 0.25) -> np.ndarray:
    """(n, 3) set-point, temperature, power: the set-point jumps to a new level every ~20 steps;
    the temperature closes `gain` of its gap to the set-point of 2 steps ago each step; the power
    follows the size of the gap now."""
    rng = np.random.default_rng(seed)
    levels = np.where(rng.random(n) < 1 / 20, rng.uniform(18.0, 24.0, n), np.nan)
    levels[0] = 21.0
    last = np.maximum.accumulate(np.where(np.isnan(levels), 0, np.arange(n)))
    setpoint = levels[last]  # each step holds the newest level set
    temperature = np.full(n, setpoint[0])
    for k in range(2, n):
        temperature[k] = temperature[k - 1] + gain * (setpoint[k - 2] - temperature[k - 1]) + rng.normal(0, 0.03)
    power = 1.0 + 0.8 * np.abs(setpoint - temperature) + rng.normal(0, 0.02, n)
    return np.stack([setpoint, temperature, power], axis=1)


def zone_config(root: Path, **sections: Any) -> Config:
    return make_config(
        root,
        channels={"names": NAMES, "period_s": 1.0, "inputs_only": [SETPOINT]},
        model={"window": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "pretrain_steps": 200, "calendar": []},
        **sections,
    )


def write(config: Config, values: np.ndarray, first: int) -> None:
    with ReplayStore(config.store_path, config.store, NAMES) as store:
        store.write([Reading(c, START_TS + first + k, float(values[k, i])) for k in range(len(values)) for i, c in enumerate(NAMES)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, BaseModel, np.ndarray]:
    config = zone_config(tmp_path_factory.mktemp("inputs-only"))
    values = zone(STEPS, seed=1)
    write(config, values, 0)
    pretrain_from_config(config, seed=0)
    return config, load_base(config.base_dir, NAMES, 1.0, [SETPOINT]), values


def test_inputs_only_must_name_some_but_not_all_configured_channels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in names"):
        make_config(tmp_path, channels={"names": NAMES, "inputs_only": ["zone1/humidity"]})
    with pytest.raises(ConfigError, match="at least one channel must be forecast"):
        make_config(tmp_path, channels={"names": NAMES, "inputs_only": NAMES})
    channels = zone_config(tmp_path).channels
    assert channels.forecast == [TEMPERATURE, POWER]


def test_the_base_forecasts_the_sensors_from_the_setpoint_it_reads(trained: tuple[Config, BaseModel, np.ndarray]) -> None:
    config, base, values = trained
    assert base.channels == [TEMPERATURE, POWER, SETPOINT] and base.targets == [TEMPERATURE, POWER]
    assert base.cfg.n_channels == 2 and base.cfg.n_covariates == 1 and base.residual_scale.shape == (2,)
    ridge = next(b for b in base.meta.get("baselines", []) if b["kind"] == RIDGE)
    assert np.shape(ridge["coef"]) == (base.cfg.lags * 3 + 1, 2)  # every channel's lags, two channels out
    rms = base.meta["held_out"]["rms"]  # per forecast channel
    assert len(rms[MODEL]) == 2
    # Reading the set-point, the model and the ridge see the temperature's moves coming; persistence cannot.
    assert rms[MODEL][0] < 0.5 * rms[PERSISTENCE][0] and rms[RIDGE][0] < 0.5 * rms[PERSISTENCE][0], rms
    # Without the set-point's columns the same ridge fit is far worse: it is the covariate that pays.
    windows = make_windows(normalise_grid(Grid(0.0, 1.0, values[:, [1, 2, 0]]), base.norm), 33).windows
    errors = {}
    for name, columns in (("with", [0, 1, 2]), ("without", [0, 1])):
        fit = fit_ridge(windows[:2500, :, columns], base.cfg.lags, outputs=2)
        assert isinstance(fit, RidgeAR)
        held = windows[2500:, :, columns]
        errors[name] = float(np.mean(np.abs([fit.predict(w[:-1])[0] - w[-1, 0] for w in held])))  # the temperature
    assert errors["with"] < 0.6 * errors["without"], errors


def test_the_base_must_read_the_channels_the_config_says_are_inputs_only(trained: tuple[Config, BaseModel, np.ndarray]) -> None:
    config, _, _ = trained
    with pytest.raises(ModelError, match="inputs only"):
        load_base(config.base_dir, [TEMPERATURE, POWER, SETPOINT], 1.0, [])


class Published:
    """Stands where the MQTT client's publish is: keeps what the pipeline publishes."""

    def __init__(self, wanted: int) -> None:
        self.forecasts: list[dict[str, Any]] = []
        self.wanted = wanted
        self.enough = threading.Event()

    def __call__(self, suffix: str, payload: Any, qos: int, retain: bool) -> None:
        if suffix == "forecast":
            self.forecasts.append(payload)
            if len(self.forecasts) >= self.wanted:
                self.enough.set()


def test_served_forecasts_leave_the_input_only_channel_out_and_beat_persistence(trained: tuple[Config, BaseModel, np.ndarray]) -> None:
    config, base, _ = trained
    values = zone(1200, seed=2)  # fresh data, the readings in config order
    published = Published(wanted=1000)
    pipeline = ScoringPipeline(
        config, published, Scorer(base, serving_model(base, None), 6.0, rule=ServingRule(mode="model"))
    )
    pipeline.start()
    try:
        for first in range(0, len(values), 10):  # 120 batches: the queue holds them all, none is dropped
            batch = values[first : first + 10]
            pipeline.on_batch([Reading(c, START_TS + 10 * STEPS + first + k, float(batch[k, i]))
                               for k in range(len(batch)) for i, c in enumerate(NAMES)])  # fmt: skip
        assert published.enough.wait(120), f"{len(published.forecasts)} forecasts published"
    finally:
        pipeline.stop()
    first = published.forecasts[0]
    assert set(first["forecast"]) == set(first["actual"]) == {TEMPERATURE, POWER}
    assert all(set(h["forecast"]) == {TEMPERATURE, POWER} for h in first["horizons"])
    assert set(pipeline.drift.status()["channels"]) == {TEMPERATURE, POWER}
    # The published temperature forecast for step t + 1 against what came: the model reads the
    # set-point from its own column, so it beats "the next = the last" by a wide margin.
    by_ts = {m["ts"]: m for m in published.forecasts}
    pairs = [(m["forecast"][TEMPERATURE], by_ts[m["forecast_ts"]]["actual"][TEMPERATURE], m["actual"][TEMPERATURE])
             for m in published.forecasts if m["forecast_ts"] in by_ts]  # fmt: skip
    forecast, actual, last = np.array(pairs).T
    assert len(pairs) > 500
    assert np.mean(np.abs(forecast - actual)) < 0.6 * np.mean(np.abs(last - actual))


def test_an_update_trains_and_refits_the_baselines_with_the_input_only_channel(tmp_path: Path) -> None:
    config = zone_config(tmp_path, train={"steps": 30, "batch_size": 16, "micro_batch": 16, "lr": 5e-3,
                                          "recent_hours": 900 / 3600, "gate_tolerance": 5.0})  # fmt: skip
    write(config, zone(STEPS, seed=1), 0)
    pretrain_from_config(config, seed=0)
    write(config, zone(900, seed=3, gain=0.1), STEPS)  # a slower zone: the new regime
    governor = PlanGovernor(lambda: Level.NORMAL, plan_candidates(config.train.batch_size, config.train.micro_batch))
    job = UpdateJob("update", "request", candidates=tuple(governor.start_candidates()), baseline_mb=300.0, budget_mb=4000.0, seed=0)

    class Sink:
        def put(self, message: dict[str, Any]) -> None:
            pass

    reply = _run_update(config, job, governor, threading.Event(), Sink())
    assert reply.accepted, reply.reason
    # Committed, not current: the daemon switches `current` once it serves the version.
    assert AdapterStore(config.adapters_dir).current() is None
    version = AdapterStore(config.adapters_dir).make_current(reply.version)
    assert version is not None and version.version == reply.version
    meta = version.meta
    ridge = next(b for b in meta.baselines if b["kind"] == RIDGE)
    assert np.shape(ridge["coef"]) == (16 * 3 + 1, 2)
    assert len(meta.held_out["rms"][MODEL]) == 2
    # Where the drift judges restart from once it serves: its held-out residuals on the forecast channels.
    assert meta.validation_residuals is not None and len(meta.validation_residuals["mean_abs"]) == 2
    assert meta.validation_residuals["windows"] == meta.windows["recent_val"]


def test_the_report_plots_the_input_only_channel_without_a_forecast(trained: tuple[Config, BaseModel, np.ndarray], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from edge_daemon.report import write_report
    from edge_daemon.report.data import collect

    config, _, _ = trained
    data = collect(config)
    assert data.forecasts is not None and data.forecasts.served.shape[1] == 2
    page = write_report(config, tmp_path / "report")[-1].read_text(encoding="utf-8")
    assert "inputs only (not forecast)" in page and SETPOINT in page
