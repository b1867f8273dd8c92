"""Live scoring: stream -> grid steps -> forecasts, residuals and anomaly scores."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_daemon.artifacts.base import BaseModel, load_base
from edge_daemon.config import ModelConfig
from edge_daemon.frames import Grid, build_grid
from edge_daemon.model import anomaly_score
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.training.pretrain import pretrain
from edge_daemon.scoring.grid import GridAssembler
from edge_daemon.scoring.serving import Scorer, ServingRule
from edge_daemon.control.status import StatusParts, StatusReport
from edge_daemon.store import Reading
from edge_daemon.times import iso

torch.set_num_threads(1)

CHANNELS = ["m1/temperature", "m1/vibration"]
TINY = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
MODEL_ONLY = ServingRule(mode="model")  # tests of the model's own forecasts and scores


def _signal(n: int, start: int = 0, seed: int = 0) -> np.ndarray:
    t = np.arange(start, start + n)
    rng = np.random.default_rng(seed)
    clean = np.stack([20 + 3 * np.sin(2 * np.pi * t / 40), 1 + 0.5 * np.cos(2 * np.pi * t / 25)], axis=1)
    return clean + rng.normal(0, 0.05, clean.shape)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    out = tmp_path_factory.mktemp("scoring") / "base"
    pretrain(Grid(0.0, 1.0, _signal(3000).astype(np.float32)), CHANNELS, 1.0, TINY, out, steps=300, lr=1e-2)
    return load_base(out)


# ---------------------------------------------------------------- GridAssembler


def test_step_completes_after_lateness() -> None:
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=1.0)
    assert assembler.add([("m1/temperature", 0.1, 1.0), ("m1/vibration", -0.2, 2.0)]) == []
    assert assembler.add([("m1/temperature", 1.4, 3.0)]) == []  # step 0 ends at 0.5: needs a reading at >= 1.5
    steps = assembler.add([("m1/vibration", 1.5, 4.0)])
    assert [s.t for s in steps] == [0.0]
    np.testing.assert_array_equal(steps[0].values, [1.0, 2.0])
    # Readings for an emitted step are late: dropped and counted; unknown channels too.
    assert assembler.add([("m1/temperature", 0.3, 9.0), ("m9/other", 2.0, 1.0)]) == []
    assert assembler.stats.late == 1 and assembler.stats.unknown_channel == 1
    # The clock completes steps when readings stop.
    # Step 1 has the temperature at 1.4; the vibration at 1.5 belongs to step 2.
    flushed = assembler.flush(now=10.0)
    assert [s.t for s in flushed] == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(flushed[0].values, [3.0, 2.0])
    np.testing.assert_array_equal(flushed[1].values, [3.0, 4.0])
    np.testing.assert_array_equal(flushed[3].values, [np.nan, 4.0])  # temperature past its 2-step fill limit
    assert assembler.flush(now=10.0) == []  # nothing left to fill: no rows of NaN


def test_stream_matches_build_grid() -> None:
    rng = np.random.default_rng(3)
    readings = []
    for k in range(300):
        for column, channel in enumerate(CHANNELS):
            if rng.random() < 0.15:
                continue  # missing readings exercise the forward fill
            if 120 <= k < 140 and column == 0:
                continue  # a gap longer than the fill limit
            readings.append((channel, k + rng.uniform(-0.45, 0.45), float(rng.normal())))
    # Delivered in batches, each shuffled, so arrival order differs from time order within the lateness.
    readings.sort(key=lambda r: r[1])
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=3, lateness_s=1.0)
    steps = []
    for start in range(0, len(readings), 7):
        batch = readings[start : start + 7]
        rng.shuffle(batch)
        steps += assembler.add(batch)
    steps += assembler.flush(now=1e9)
    assert assembler.stats.late == 0

    ts = np.array([r[1] for r in readings])
    ch = np.array([CHANNELS.index(r[0]) for r in readings])
    vals = np.array([r[2] for r in readings])
    grid = build_grid(ts, ch, vals, len(CHANNELS), 1.0, 3)
    # The stream keeps forward-filling past the last reading, the grid ends there.
    assert [s.t for s in steps] == list(grid.times) + [300.0, 301.0, 302.0]
    steps = steps[: len(grid)]
    np.testing.assert_allclose(np.stack([s.values for s in steps]), grid.values, rtol=1e-6)
    assert np.isnan(np.stack([s.values for s in steps])[130, 0])


def test_long_outage_is_skipped_not_emitted() -> None:
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=0.0)
    first = assembler.add([(c, float(t), 1.0) for t in range(5) for c in CHANNELS])
    later = assembler.add([(c, 100000.0 + t, 2.0) for t in range(5) for c in CHANNELS])
    times = [s.t for s in first + later]
    # 5 steps, 2 forward-filled ones after the outage stopped, then the new readings: no 100000 NaN rows.
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100000.0, 100001.0, 100002.0, 100003.0]


class Mono:
    """A monotonic clock the test moves: arrival times are explicit."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stream(assembler: GridAssembler, mono: Mono, ts: list[float], extra: dict[int, list[tuple[str, float, float]]] | None = None) -> list[float]:
    """One batch per step (both channels at ts[i], plus extra[i]), arriving a second apart; the times of the steps emitted."""
    times = []
    for i, t in enumerate(ts):
        times += [s.t for s in assembler.add([(c, t, 1.0) for c in CHANNELS] + (extra or {}).get(i, []))]
        mono.now += 1.0
    return times


def test_one_reading_far_ahead_of_the_stream_does_not_move_the_grid() -> None:
    mono = Mono()
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=1.0, mono=mono)
    assert assembler.outlier_floor_s == 60.0
    ahead = {50: [("m1/temperature", 50.0 + 86400.0, 9.0)], 70: [("m1/vibration", 70.0 + 200.0, 9.0)], 80: [("m1/vibration", 1e20, 9.0)]}
    times = _stream(assembler, mono, [float(t) for t in range(100)], ahead)
    # Every step of the stream, none late: the day-ahead and the 200 s-ahead readings were set
    # aside, then dropped once the stream had moved on 3 steps; 1e20 is no time at all.
    assert times == [float(t) for t in range(98)]
    assert assembler.stats.late == 0 and assembler.stats.last_late_ts is None
    assert assembler.stats.outliers == 2 and assembler.set_aside == 0 and assembler.stats.jumps == 0
    assert assembler.stats.non_finite == 1
    assert assembler.newest_ts == 99.0
    # Set aside, a reading waits (not counted yet) until the stream has advanced DROP_STEPS steps.
    assembler.add([("m1/temperature", 100.0 + 3600.0, 1.0)])
    assert assembler.set_aside == 1 and assembler.stats.outliers == 2
    _stream(assembler, mono, [100.0, 101.0])
    assert assembler.set_aside == 1
    _stream(assembler, mono, [102.0])
    assert assembler.set_aside == 0 and assembler.stats.outliers == 3


def test_a_forward_jump_of_the_whole_stream_is_followed_once_three_later_steps_confirm_it() -> None:
    """A sensor clock corrected a day forward: every reading from then on is a day ahead."""
    mono = Mono()
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=1.0, mono=mono)
    times = _stream(assembler, mono, [float(t) for t in range(50)])
    assert times == [float(t) for t in range(48)]
    jumped = [86400.0 + t for t in range(50, 70)]
    times = _stream(assembler, mono, jumped[:3])
    assert times == [] and assembler.set_aside == 6 and assembler.newest_ts == 49.0  # not yet: 2 later steps
    times += _stream(assembler, mono, jumped[3:])
    # The old stream's last steps and 2 forward-filled ones, then the new stream from its first step.
    assert times == [48.0, 49.0, 50.0, 51.0] + jumped[:-2]
    assert assembler.stats.jumps == 1 and assembler.stats.outliers == 0 and assembler.stats.late == 0
    assert assembler.set_aside == 0 and assembler.newest_ts == jumped[-1]


def test_a_real_gap_is_followed_at_once_when_as_much_time_has_passed() -> None:
    mono = Mono()
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=1.0, mono=mono)
    _stream(assembler, mono, [float(t) for t in range(10)])
    mono.now += 3600.0  # the sensors were silent for an hour: their next readings are an hour on
    times = _stream(assembler, mono, [3610.0, 3611.0, 3612.0])
    assert times == [8.0, 9.0, 10.0, 11.0, 3610.0]
    assert assembler.set_aside == 0 and assembler.stats.jumps == 0 and assembler.stats.outliers == 0


def test_a_backfill_arriving_at_once_and_a_gap_within_it() -> None:
    """Old readings delivered as fast as they come (no arrival time passes), in order, with a
    day-long hole in the middle: all of it is assembled, none late."""
    mono = Mono()
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=2, lateness_s=1.0, mono=mono)
    ts = [float(t) for t in range(500)] + [86400.0 + t for t in range(500)]
    steps = []
    for first in range(0, len(ts), 50):
        steps += assembler.add([(c, t, 1.0) for t in ts[first : first + 50] for c in CHANNELS])
    assert [s.t for s in steps] == [float(t) for t in range(502)] + [86400.0 + t for t in range(498)]
    assert assembler.stats.late == 0 and assembler.stats.outliers == 0 and assembler.stats.jumps == 1


def test_a_channel_whose_clock_runs_a_day_ahead_is_dropped_and_the_stream_scored() -> None:
    """Only the vibration sensor's clock is a day ahead: the stream the rest keeps advancing wins."""
    mono = Mono()
    assembler = GridAssembler(CHANNELS, period_s=1.0, max_fill_steps=0, lateness_s=1.0, mono=mono)
    times = []
    for t in range(30):
        times += [s.t for s in assembler.add([("m1/temperature", float(t), 1.0), ("m1/vibration", 86400.0 + t, 2.0)])]
        mono.now += 1.0
    assert times == [float(t) for t in range(28)]
    # Set aside in groups of 3 steps, each dropped as the stream reaches 3 steps on; the last waits.
    assert assembler.stats.outliers == 27 and assembler.set_aside == 3
    assert assembler.stats.jumps == 0 and assembler.stats.late == 0 and assembler.newest_ts == 29.0


# ---------------------------------------------------------------- Scorer


def test_forecast_residual_and_score(base: BaseModel) -> None:
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, min_history=8, version=None, rule=MODEL_ONLY)
    data = _signal(30, start=3000, seed=1)
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    assert all(r is None for r in results[:7])
    first, second = results[7], results[8]
    assert first.residual is None and first.score is None and first.forecast_t == 3008.0

    history = torch.from_numpy(base.norm.apply(data[:8])).unsqueeze(0)
    with torch.no_grad():
        expected_norm = base.model(history)[0, -1].numpy()
    np.testing.assert_allclose(first.forecast, base.norm.invert(expected_norm), rtol=1e-5)
    expected_residual = expected_norm - base.norm.apply(data[8])
    np.testing.assert_allclose(second.residual, expected_residual, rtol=1e-4, atol=1e-6)
    expected_score = float(anomaly_score(torch.from_numpy(expected_residual), base.residual_scale_tensor()))
    assert second.score == pytest.approx(expected_score, rel=1e-5)
    # Past min_history the buffer keeps growing up to the model window, then rolls.
    assert results[-1].forecast.shape == (2,)
    history = torch.from_numpy(base.norm.apply(data[-16:])).unsqueeze(0)
    with torch.no_grad():
        np.testing.assert_allclose(results[-1].forecast, base.norm.invert(base.model(history)[0, -1].numpy()), rtol=1e-5)


def test_spike_is_an_anomaly_and_normal_data_is_not(base: BaseModel) -> None:
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, rule=MODEL_ONLY)
    data = _signal(200, start=3000, seed=2)
    data[150, 0] += 3.0  # 60 noise sigmas on the smooth channel
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    scored = {i: r for i, r in enumerate(results) if r is not None and r.score is not None}
    normal = [r.score for i, r in scored.items() if i < 150]
    assert len(normal) == 150 - 16
    assert np.median(normal) < 2.0  # residual_scale makes ~1 the typical score
    assert not any(r.anomaly for i, r in scored.items() if i < 150)
    assert scored[150].anomaly and scored[150].score > 6.0


def test_gaps_and_nan_restart_history(base: BaseModel) -> None:
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, min_history=4, rule=MODEL_ONLY)
    data = _signal(20, start=3000)
    for i in range(6):
        scorer.add_step(float(i), data[i])
    assert scorer.add_step(6.0, np.array([np.nan, 1.0])) is None
    assert [scorer.add_step(float(7 + i), data[i]) is None for i in range(4)] == [True, True, True, False]
    # A skipped step (t jumps by 2 periods) restarts too.
    assert scorer.add_step(13.0, data[5]) is None


def test_swap_model(base: BaseModel) -> None:
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, min_history=4, version=None, rule=MODEL_ONLY)
    data = _signal(10, start=3000)
    for i in range(5):
        before = scorer.add_step(float(i), data[i])
    other = copy.deepcopy(base.model)
    with torch.no_grad():
        other.head.bias += 1.0  # every forecast moves by one std per channel
    scorer.swap_model(other, version=7)
    after = scorer.add_step(5.0, data[5])
    assert after.model_version is None  # the residual at t=5 is of the base model's forecast
    assert after.forecast_version == 7  # the forecast of t=6 is the new model's
    np.testing.assert_allclose(base.norm.apply(before.forecast) - base.norm.apply(data[5]), after.residual, atol=1e-4)
    history = torch.from_numpy(base.norm.apply(data[:6])).unsqueeze(0)
    with torch.no_grad():
        np.testing.assert_allclose(after.forecast, base.norm.invert(other(history)[0, -1].numpy()), rtol=1e-5)
    assert scorer.add_step(6.0, data[6]).model_version == 7 and scorer.version == 7


def test_end_to_end_stream(base: BaseModel, tmp_path: Path) -> None:
    """MQTT-like readings -> assembler -> scorer: every completed step after the warm-up is scored."""
    assembler = GridAssembler(CHANNELS, base.period_s, max_fill_steps=2, lateness_s=1.0)
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, rule=MODEL_ONLY)
    data = _signal(60, start=3000, seed=4)
    results = []
    for i, row in enumerate(data):
        batch = [(CHANNELS[c], 3000.0 + i + 0.1 * c, float(row[c])) for c in range(2)]
        for step in assembler.add(batch):
            results.append(scorer.add_step(step.t, step.values))
    scored = [r for r in results if r is not None and r.score is not None]
    assert len(results) == 58  # the last two steps wait for the lateness allowance
    assert len(scored) == 58 - 16
    assert max(r.score for r in scored) < 6.0


def _biased(base: BaseModel) -> torch.nn.Module:
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        model.head.bias += 1.0  # every forecast one std off: any baseline beats it
    return model


def test_a_model_that_loses_to_a_baseline_is_not_served(base: BaseModel) -> None:
    rule = ServingRule(mode="best", compare_steps=50, margin=0.05)
    scorer = Scorer(base, _biased(base), anomaly_threshold=6.0, held_out={}, rule=rule)
    baselines = {b.name: b for b in scorer._baselines}  # the base's: persistence, seasonal naive (periods 40 and 25), ridge
    assert scorer.served == "model" and {"persistence", "ridge"} <= set(baselines)
    data = _signal(200, start=3000, seed=5)
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    status = scorer.comparison()
    assert status["served"] == "ridge" and status["switches"] == 2, status  # one per channel
    assert status["mae"]["ridge"] == min(status["mae"].values()) and status["mae"]["persistence"] < status["mae"]["model"]
    switched = next(i for i, r in enumerate(results) if r is not None and r.forecast_by == "ridge")
    assert switched == 16 + 50 - 1  # a whole comparison window first: residuals from step 16, the 50th at 65
    last = results[-1]
    ridge = baselines["ridge"]
    expected = ridge.predict(base.norm.apply(data[-scorer._capacity :]))
    np.testing.assert_allclose(last.forecast, base.norm.invert(expected), rtol=1e-5)
    # The residual scored is the served forecast's; drift still sees the model's own.
    assert last.served_by == "ridge" and last.model_residual is not None
    assert np.abs(last.model_residual).mean() > 3 * np.abs(last.residual).mean()
    # "model" serves the model whatever the comparison says.
    pinned = Scorer(base, _biased(base), anomaly_threshold=6.0, held_out={}, rule=ServingRule(mode="model", compare_steps=50))
    for i, row in enumerate(data):
        pinned.add_step(float(3000 + i), row)
    assert pinned.comparison()["served"] == "model" and pinned.comparison()["switches"] == 0


def test_serving_starts_from_the_held_out_choice_and_a_new_model_starts_a_new_record(base: BaseModel) -> None:
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, held_out={"serve": "persistence"})
    data = _signal(40, start=3000, seed=6)
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    assert results[-1].forecast_by == "persistence"
    np.testing.assert_allclose(results[-1].forecast, data[-1], rtol=1e-5)
    assert scorer.comparison()["steps_compared"] > 0
    scorer.swap_model(copy.deepcopy(base.model), version=3, held_out={"serve": "model"})
    assert scorer.served == "model" and scorer.comparison()["steps_compared"] == 0
    after = scorer.add_step(3040.0, _signal(1, start=3040, seed=6)[0])
    assert after.forecast_by == "model" and after.forecast_version == 3
    assert scorer.comparison()["steps_compared"] == 0  # that residual was of a forecast from before the swap


def test_each_channel_is_served_by_its_own_best_forecaster(base: BaseModel) -> None:
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        model.head.bias[0] += 1.0  # only the first channel's forecasts are off
    scorer = Scorer(base, model, anomaly_threshold=6.0, held_out={}, rule=ServingRule(mode="best", compare_steps=50))
    data = _signal(200, start=3000, seed=7)
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    served = scorer.served_by_channel
    assert served[CHANNELS[0]] != "model"
    mae = scorer.comparison()["mae_by_channel"]
    for c, channel in enumerate(CHANNELS):  # each channel's choice is its lowest recent error
        assert mae[served[channel]][c] == min(m[c] for m in mae.values())
    # The forecast is put together channel by channel from the chosen forecasters.
    history = base.norm.apply(data[-scorer._capacity :])
    baselines = {b.name: b for b in scorer._baselines}
    with torch.no_grad():
        by_model = model(torch.from_numpy(history[-base.cfg.window :].astype(np.float32)).unsqueeze(0))[0, -1].numpy()
    expected = [by_model[c] if served[ch] == "model" else baselines[served[ch]].predict(history)[c] for c, ch in enumerate(CHANNELS)]
    np.testing.assert_allclose(results[-1].forecast, base.norm.invert(np.array(expected)), rtol=1e-4)
    assert results[-1].forecast_by_channel == tuple(served[ch] for ch in CHANNELS)
    assert results[-1].forecast_by == (served[CHANNELS[0]] if len(set(served.values())) == 1 else "mixed")


def test_further_horizons_are_forecast_and_scored_when_their_step_arrives(base: BaseModel) -> None:
    """The default horizons at 1 s with a 16-step window: the next step and 8 ahead (half the window).
    The 8-step forecast is the model's direct one, and 8 steps later it is compared with what came,
    beside every baseline's forecast of the same step."""
    assert base.cfg.horizons == (1, 8)
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, rule=MODEL_ONLY)
    data = _signal(60, start=3000, seed=1)
    results = [scorer.add_step(float(3000 + i), row) for i, row in enumerate(data)]
    (far,) = results[20].horizons
    assert far.steps == 8 and far.t == 3028.0 and far.by_channel == ("model", "model") and far.by == "model"
    history = torch.from_numpy(base.norm.apply(data[5:21]).astype(np.float32)).unsqueeze(0)
    with torch.no_grad():
        expected = base.model.forward_horizons(history)[0, -1, 1].numpy()
    np.testing.assert_allclose(far.forecast, base.norm.invert(expected), rtol=1e-5)
    assert all(r is None or r.horizon_residuals is None for r in results[:23])  # the first forecast was made at 15
    arrived = results[28].horizon_residuals[8]
    # Ridge has no 8-step fit here: 16 lags and 8 steps ahead do not fit in a 17-step window.
    assert set(arrived) == {"model"} | {b["kind"] for b in base.meta["baselines"]} - {"ridge"}
    np.testing.assert_allclose(arrived["model"], expected - base.norm.apply(data[28]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrived["persistence"], base.norm.apply(data[20]) - base.norm.apply(data[28]), atol=1e-5)
    compared = scorer.comparison()["horizons"]["8"]
    assert compared["steps_compared"] == 60 - 23 and compared["served_by_channel"] == dict.fromkeys(CHANNELS, "model")


# ---------------------------------------------------------------- ScoringPipeline: stalls


def test_a_stall_is_reported_and_logged_once_when_it_starts_and_when_it_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Four steps a day ahead in one batch (a gateway's buffer from a wrong clock) confirm each
    other, the grid follows them, and the real stream is late from then on: `status` says so."""
    from conftest import make_config

    mono = Mono()
    config = make_config(tmp_path)
    pipeline = ScoringPipeline(config, lambda *args: None, held_rows=lambda: 7, mono=mono)
    assert pipeline.stall_s == 60.0
    names = config.channels.names
    start = 1_800_000_000.0

    def second(t: float) -> None:
        mono.now += 1.0
        pipeline.feed([Reading(name, t, 1.0) for name in names])

    for t in range(10):
        second(start + t)
    pipeline.feed([Reading(name, start + 86400.0 + t, 1.0) for t in range(10, 14) for name in names])
    assert pipeline.assembler.stats.jumps == 1 and pipeline.stall_warning() is None
    steps = pipeline.steps
    caplog.set_level(logging.INFO, logger="edge_daemon.pipeline")
    for t in range(14, 75):
        second(start + t)
    # Readings every second and no step: stalled once more than 60 s passed since the last step.
    assert pipeline.steps == steps
    counters = pipeline.counters()
    assert counters["late_readings"] == 61 * 3 and counters["last_late"] == iso(start + 74)
    assert counters["held"] == 7 and counters["outliers"] == 0 and counters["set_aside"] == 0
    assert counters["stalled"] is not None and counters["stalled"].startswith("scoring stalled: readings arrive but no grid step completed for 61 s")
    assert pipeline.status()["stalled"] == counters["stalled"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "183 late readings" in warnings[0].getMessage()
    # The retained MQTT status carries the counters, the STATUS= line the stall.
    parts = StatusParts(device=config.device.id, started_unix=time.time(), uptime_s=1.0, scoring=pipeline)
    report = StatusReport(parts)
    assert report.online()["scoring"] == counters
    assert "scoring stalled" in report.line().split(", ")
    # Readings stop: nothing is expected of scoring, so the stall is over.
    mono.now += 61.0
    pipeline.feed([])
    assert pipeline.stall_warning() is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == ["scoring stall over: no readings arrive"]
    assert "scoring stalled" not in StatusReport(parts).line()
    assert StatusReport(parts).online()["scoring"]["stalled"] is None


def test_the_clock_flush_follows_the_accepted_stream_not_a_reading_set_aside(tmp_path: Path) -> None:
    """A backfill of the last ten minutes pauses after an outlier an hour ahead: the clock
    completes the backfill's own steps only, so its next readings are not late."""
    from conftest import make_config

    config = make_config(tmp_path)
    pipeline = ScoringPipeline(config, lambda *args: None)
    start = float(int(time.time()) - 600)
    pipeline.feed([Reading(name, start + t, 1.0) for t in range(100) for name in config.channels.names])
    pipeline.feed([Reading("m1/temperature", time.time() + 3600.0, 1.0)])
    assert pipeline.assembler.set_aside == 1 and pipeline.newest_ts == start + 99
    pipeline.flush_by_clock()
    assert pipeline.steps == 100  # every step up to the newest accepted reading, none made up beyond it
    pipeline.feed([Reading(name, start + t, 1.0) for t in range(100, 200) for name in config.channels.names])
    assert pipeline.assembler.stats.late == 0 and pipeline.steps == 198
    assert pipeline.assembler.stats.outliers == 1 and pipeline.counters()["outliers"] == 1


def test_a_scoring_backlog_is_bounded_by_readings_and_the_oldest_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Batches handed over faster than scoring takes them (a slow device, a burst of redelivered
    readings): at most MAX_PENDING_READINGS wait, the oldest batches go first (they are stored;
    scoring catches up to the live stream), and status counts them."""
    from conftest import make_config

    from edge_daemon.pipeline import MAX_PENDING_READINGS

    config = make_config(tmp_path)
    pipeline = ScoringPipeline(config, lambda *args: None)  # not started: nothing takes the batches
    names = config.channels.names
    per_batch = 1000
    batches = 3 * MAX_PENDING_READINGS // per_batch
    with caplog.at_level(logging.WARNING, logger="edge_daemon.pipeline"):
        for b in range(batches):
            pipeline.on_batch([(names[k % len(names)], float(b * per_batch + k), 1.0) for k in range(per_batch)])
    kept = MAX_PENDING_READINGS // per_batch
    status = pipeline.status()
    assert (status["dropped_batches"], status["dropped_readings"]) == (batches - kept, (batches - kept) * per_batch)
    assert sum("scoring is behind" in r.getMessage() for r in caplog.records) == 1  # once, not per batch
    waiting = []
    while (batch := pipeline._next_batch(0.0)) is not None:
        waiting.append(batch)
    assert len(waiting) == kept and waiting[0][0][1] == float((batches - kept) * per_batch)  # the newest kept, in order
    assert [b[0][1] for b in waiting] == sorted(b[0][1] for b in waiting)


# ---------------------------------------------------------------- no base: baselines alone


def test_without_a_base_the_best_baseline_fitted_on_the_data_is_served_and_scored() -> None:
    from edge_daemon.errors import TrainingError
    from edge_daemon.training.pretrain import stand_in_base

    cfg = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, season_max_steps=64)
    stand_in = stand_in_base(Grid(0.0, 1.0, _signal(600).astype(np.float32)), CHANNELS, cfg)
    assert stand_in.stand_in and stand_in.model is None
    held_out = stand_in.meta["held_out"]
    assert "model" not in held_out["mae"] and held_out["serve"] != "persistence", held_out  # smooth sines: persistence loses
    scorer = Scorer(stand_in, None, anomaly_threshold=6.0, rule=ServingRule(mode="best", compare_steps=50))
    data = _signal(300, start=600, seed=3)
    data[250, 0] += 3.0
    results = [scorer.add_step(float(600 + i), row) for i, row in enumerate(data)]
    scored = {i: r for i, r in enumerate(results) if r is not None and r.score is not None}
    assert min(scored) == 16  # forecasts from a whole window on, as with a model
    first = scored[16]
    assert first.model_residual is None and first.model_version is None and first.served_by == held_out["serve"]
    assert "model" not in first.residuals and first.forecast_by in {"persistence", "seasonal_naive", "ridge", "mixed"}
    # Forecasts in raw units, near the data; anomaly scores ~1 by the served baseline's held-out scale.
    assert np.abs(results[-1].forecast - data[-1]).max() < 1.0
    normal = [r.score for i, r in scored.items() if i < 250]
    assert np.median(normal) < 2.0 and not any(r.anomaly for i, r in scored.items() if i < 250)
    assert scored[250].anomaly
    comparison = scorer.comparison()
    assert comparison["baselines_only"] and "model" not in comparison["mae"] and comparison["steps_compared"] == 50
    with pytest.raises(ValueError):
        scorer.swap_model(torch.nn.Linear(1, 1), 1)
    # Too little data for a held-out judgement: nothing is served.
    with pytest.raises(TrainingError, match="not enough data"):
        stand_in_base(Grid(0.0, 1.0, _signal(30).astype(np.float32)), CHANNELS, cfg)


def test_a_channel_constant_in_the_held_out_windows_gets_the_floor_scale_not_zero() -> None:
    """Baselines fitted without a base: a channel that did not move in the held-out windows has a
    held-out error of 0; its anomaly scale is floored (STAND_IN_MIN_SCALE), not 1e-6, which made
    every later change of it an anomaly a million times over."""
    from edge_daemon.training.pretrain import STAND_IN_MIN_SCALE, stand_in_base

    data = _signal(600).astype(np.float32)
    data[:, 1] = 1.0  # a quantised reading that has not moved (a set-point, a closed valve)
    stand_in = stand_in_base(Grid(0.0, 1.0, data), CHANNELS, TINY)
    assert stand_in.residual_scale[1] == pytest.approx(STAND_IN_MIN_SCALE, rel=1e-6)
    assert stand_in.residual_scale[0] > STAND_IN_MIN_SCALE
