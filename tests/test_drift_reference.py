"""Input drift against the training data (PSI over a rolling window), on the sample motor.

The motor has a daily cycle, a batch cycle and weather: its inputs change all
the time in normal operation. Compared with the reference over a window of a
whole day, stationary days raise nothing, while a regime change raises one
alert on the channel it changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.artifacts.base import load_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.config import DriftConfig, ModelConfig
from edge_daemon.drift import DriftMonitor
from edge_daemon.drift.reference import Reference, ReferenceShift, psi
from edge_daemon.frames import build_grid
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.training.pretrain import pretrain
from edge_daemon.scoring.serving import Scorer
from sample_sensors.generate import CHANNELS, generate_labeled, readings
from tests.conftest import make_config

SCALE = 144  # one simulated day in 600 steps of 1 s
DAY = int(86400 / SCALE)


def motor(days: int, seed: int, change_day: float | None = None, regime: str = "bearing_wear") -> np.ndarray:
    change = None if change_day is None else int(change_day * DAY)
    data = generate_labeled(days * DAY, seed=seed, time_scale=SCALE, regime_change_at=change, regime=regime)  # type: ignore[arg-type]
    return np.stack([data.values[c] for c in CHANNELS], axis=1)


def monitor_for(values: np.ndarray, reference_days: int = 2, **drift: object) -> DriftMonitor:
    references = [Reference.from_values(values[: reference_days * DAY, c]) for c in range(len(CHANNELS))]
    cfg = DriftConfig(input_window_s=DAY * SCALE, **drift)  # a day of the motor's time, in seconds
    return DriftMonitor(list(CHANNELS), cfg, input_reference=references, period_s=SCALE)


def input_events(monitor: DriftMonitor, values: np.ndarray, start: int) -> list[tuple[int, str]]:
    events = []
    for k in range(start, len(values)):
        events += [(k, e.channel) for e in monitor.update_inputs(values[k], float(k)) if e.kind == "inputs"]
    return events


def test_reference_is_the_deciles_and_psi_measures_the_shift() -> None:
    rng = np.random.default_rng(0)
    ref = Reference.from_values(rng.normal(0, 1, 20000))
    assert len(ref.edges) == 9 and ref.proportions == pytest.approx([0.1] * 10, abs=1e-3)
    assert ref.edges[4] == pytest.approx(0.0, abs=0.05)
    same = np.bincount(np.searchsorted(ref.edges, rng.normal(0, 1, 5000), side="right"), minlength=10)
    def shifted(by: float) -> np.ndarray:
        return np.bincount(np.searchsorted(ref.edges, rng.normal(by, 1, 5000), side="right"), minlength=10)

    assert psi(same, ref) < 0.02
    # The default threshold (1.0) sits between a 1 and a 1.5 standard deviation shift of the whole window.
    assert 0.5 < psi(shifted(1.0), ref) < 1.0 < psi(shifted(1.5), ref)
    assert Reference.from_dict(json.loads(json.dumps(ref.as_dict()))) == ref
    with pytest.raises(ValueError):
        Reference.from_dict({"edges": [1.0, 0.0], "proportions": [0.3, 0.3, 0.4]})
    with pytest.raises(ValueError, match="at least 10 finite values"):
        Reference.from_values([1.0, np.nan, 2.0])


def test_one_alert_an_episode_and_rearmed_once_back() -> None:
    rng = np.random.default_rng(1)
    shift = ReferenceShift(200, reference=Reference.from_values(rng.normal(0, 1, 5000)), every=10)
    fired = [k for k, x in enumerate(rng.normal(0, 1, 400)) if shift.update(x)]
    assert fired == [] and shift.last_psi is not None and shift.last_psi < 0.5
    fired = [k for k, x in enumerate(rng.normal(2, 1, 400)) if shift.update(x)]
    assert len(fired) == 1 and fired[0] < 200 and shift.drifted  # within the window; once, though PSI stays high
    fired = [k for k, x in enumerate(rng.normal(0, 1, 400)) if shift.update(x)]
    assert fired == [] and not shift.drifted  # back to normal: re-armed
    fired = [k for k, x in enumerate(rng.normal(-2, 1, 400)) if shift.update(x)]
    assert len(fired) == 1


def test_stationary_motor_days_raise_no_input_drift_where_per_value_detectors_fire_all_day() -> None:
    for seed in (0, 1, 2):
        values = motor(12, seed)
        assert input_events(monitor_for(values), values, 2 * DAY) == [], f"seed {seed}"
    # The same days through ADWIN on every value: each change of operating state is "drift".
    stream = DriftMonitor(list(CHANNELS), DriftConfig(inputs="stream"))
    assert len(input_events(stream, values, 2 * DAY)) > 5 * 10


@pytest.mark.parametrize(
    ("regime", "channel"), [("bearing_wear", "m1/vibration"), ("current_recalibration", "m1/current")]
)
def test_regime_change_raises_one_alert_on_its_channel_soon(regime: str, channel: str) -> None:
    change = 6 * DAY
    values = motor(12, seed=0, change_day=6, regime=regime)
    monitor = monitor_for(values)
    events = input_events(monitor, values, 2 * DAY)
    on_channel = [k for k, name in events if name == channel]
    assert len(on_channel) == 1, events  # one alert for the whole new regime
    # PSI passes 1.0 once about half the window holds the new regime.
    assert DAY // 4 <= on_channel[0] - change <= DAY * 3 // 4, events
    status = monitor.status()
    assert status["inputs"] == "reference"
    psi_status = status["channels"][channel]["psi"]
    assert psi_status["value"] > 1.0 and psi_status["reference"] == "training data"
    assert status["channels"][channel]["inputs"]["state"] == "drift"
    # An accepted adapter learnt the new regime: the next window becomes the reference.
    monitor.reset_baseline(float(len(values)))
    after = monitor.status()["channels"][channel]
    assert after["inputs"]["state"] == "stable" and after["psi"]["reference"] == "learning"


def test_without_a_reference_the_first_window_becomes_it() -> None:
    rng = np.random.default_rng(3)
    cfg = DriftConfig(input_window_s=200)
    monitor = DriftMonitor(["a/x"], cfg)
    for k in range(150):
        assert monitor.update_inputs([rng.normal()], float(k)) == []
    status = monitor.status()["channels"]["a/x"]["psi"]
    assert status["reference"] == "learning" and status["window_filled"] == 0.75
    events = [k for k in range(150, 1000) if monitor.update_inputs([rng.normal() + (3.0 if k >= 700 else 0.0)], float(k))]
    assert monitor.status()["channels"]["a/x"]["psi"]["reference"] == "first window"
    assert len(events) == 1 and 700 <= events[0] <= 900  # within half the window of the shift


def test_pretrain_records_the_reference_and_the_pipeline_judges_inputs_by_it(tmp_path: Path) -> None:
    data = generate_labeled(3 * DAY, seed=4, time_scale=SCALE)
    grid = build_grid(*readings(data, 0, 3 * DAY), 3, 1.0, 5)
    model_cfg = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    pretrain(grid, list(CHANNELS), 1.0, model_cfg, tmp_path / "base", steps=5)
    base = load_base(tmp_path / "base", list(CHANNELS), 1.0)
    recorded = base.meta["input_reference"]
    assert len(recorded) == 3
    assert Reference.from_dict(recorded[1]) == Reference.from_values(grid.values[:, 1])

    cfg = make_config(tmp_path, drift={"input_window_s": 200})
    pipeline = ScoringPipeline(cfg, lambda *args: None, Scorer(base, serving_model(base, None), 6.0))
    channels = pipeline.drift.status()["channels"]
    assert all(ch["psi"]["reference"] == "training data" for ch in channels.values())


def heteroscedastic_residuals(days: int, seed: int, grow_from: int | None = None, factor: float = 3.0) -> np.ndarray:
    """(days * DAY, 3) residuals whose size follows the time of day (0.4x to 3x), as a real model's do."""
    rng = np.random.default_rng(seed)
    k = np.arange(days * DAY)
    size = 1.0 + 0.9 * np.sin(2 * np.pi * k / DAY) + 0.6 * (np.sin(2 * np.pi * k / (DAY / 4)) > 0.9)
    residuals = rng.standard_t(4, (days * DAY, 3)) * 0.05 * size[:, None]
    if grow_from is not None:
        residuals[grow_from:, 1] *= factor
    return residuals


def residual_events(monitor: DriftMonitor, residuals: np.ndarray) -> list[tuple[int, str]]:
    events = []
    for k in range(len(residuals)):
        events += [(k, e.channel) for e in monitor.update_residuals(residuals[k], float(k)) if e.kind == "residuals"]
    return events


def test_residuals_judged_over_a_day_not_by_the_time_of_day() -> None:
    cfg = DriftConfig(residual_window_s=DAY)
    for seed in (0, 1, 2):
        residuals = heteroscedastic_residuals(10, seed)
        assert residual_events(DriftMonitor(list(CHANNELS), cfg), residuals) == [], f"seed {seed}"
    # A per-residual ADWIN reads the daily swing of the model's error as drift.
    stream = DriftMonitor(list(CHANNELS), DriftConfig(residuals="stream"))
    assert residual_events(stream, residuals) != []


def test_residuals_growing_threefold_drift_once_and_an_adapter_resets_the_baseline() -> None:
    change = 6 * DAY
    residuals = heteroscedastic_residuals(10, seed=4, grow_from=change)
    monitor = DriftMonitor(list(CHANNELS), DriftConfig(residual_window_s=DAY))
    learning = monitor.status()["channels"]["m1/vibration"]["residual_window"]
    assert learning["baseline"] == "learning" and learning["window_filled"] == 0.0
    events = residual_events(monitor, residuals)
    assert [name for _, name in events] == ["m1/vibration"]
    assert 0 < events[0][0] - change <= DAY // 2  # mean of the day doubles once a third of it is new
    assert monitor.residual_drift_detected
    channel = monitor.status()["channels"]["m1/vibration"]
    assert channel["residuals"]["state"] == "drift" and channel["residual_window"]["ratio"] > 2.0
    assert channel["residual_level"] > 2.0 * channel["residual_baseline"]

    # An accepted adapter: the next day is the new baseline, and the new size is normal.
    monitor.reset_baseline(float(len(residuals)))
    assert not monitor.residual_drift_detected
    assert monitor.status()["channels"]["m1/vibration"]["residual_window"]["baseline"] == "learning"
    assert residual_events(monitor, heteroscedastic_residuals(10, seed=5, grow_from=0)) == []
