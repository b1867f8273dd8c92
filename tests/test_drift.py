"""Drift detectors and DriftMonitor on seeded streams: no drift when stationary,
detection at an exact index within a bounded delay after a level or variance
change, agreement with river (a test dependency), status shape and resets.
"""

from __future__ import annotations

import json
import math
import random
from itertools import accumulate

import numpy as np
import pytest
from pydantic import ValidationError

from edge_daemon.config import DriftConfig
from edge_daemon.drift import ADWIN, KSWIN, DriftDetector, DriftMonitor, PageHinkley, make_detector
from edge_daemon.drift.kswin import ks_two_sided_pvalue

DETECTORS = ["adwin", "page_hinkley", "kswin"]
CHANGE = 1000  # index of the first value of the new regime in detector streams
MAX_DELAY = 100  # steps from a change to its detection we accept (defaults, 1-sigma level / 3x sd change)


def detections(detector: DriftDetector, stream: np.ndarray) -> list[int]:
    return [i for i, x in enumerate(stream.tolist()) if detector.update(x).drift_detected]


def seeded_streams() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    stationary = rng.normal(0, 1, 5000)
    level = np.concatenate([rng.normal(0, 1, CHANGE), rng.normal(1, 1, 1000)])
    variance = np.concatenate([rng.normal(0, 1, CHANGE), rng.normal(0, 3, 1000)])
    return {"stationary": stationary, "level": level, "variance": variance}


# -- detectors ----------------------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_stationary_stream_raises_no_drift(name: str) -> None:
    stream = seeded_streams()["stationary"]
    detector = make_detector(DriftConfig(detector=name), kind="inputs", seed=0)
    assert detections(detector, stream) == []
    spread = make_detector(DriftConfig(detector=name), kind="inputs", seed=0)
    assert detections(spread, np.abs(np.diff(stream))) == []


@pytest.mark.parametrize(("name", "expected"), [("adwin", 1055), ("page_hinkley", 1050), ("kswin", 1030)])
def test_level_change_detected_within_bound(name: str, expected: int) -> None:
    detector = make_detector(DriftConfig(detector=name), kind="inputs", seed=0)
    found = detections(detector, seeded_streams()["level"])
    assert found[0] == expected
    assert 0 <= found[0] - CHANGE <= MAX_DELAY


@pytest.mark.parametrize(("name", "expected"), [("adwin", 1023), ("page_hinkley", 1013), ("kswin", 1036)])
def test_variance_change_detected_on_spread_within_bound(name: str, expected: int) -> None:
    # Detectors watch means; a change of spread shows in |step-to-step change|
    # (what DriftMonitor feeds them). Difference i spans values i and i+1, so
    # the first one touching the new regime is CHANGE - 1.
    detector = make_detector(DriftConfig(detector=name), kind="inputs", seed=0)
    found = detections(detector, np.abs(np.diff(seeded_streams()["variance"])))
    assert found[0] == expected
    assert 0 <= found[0] - (CHANGE - 1) <= MAX_DELAY


def test_adwin_alone_misses_a_pure_variance_change() -> None:
    # Why the monitor adds a spread detector: ADWIN on the values sees nothing.
    assert detections(make_detector(DriftConfig(), kind="inputs"), seeded_streams()["variance"]) == []


def test_update_returns_self_and_restarts_after_detection() -> None:
    adwin = ADWIN(grace_period=10)
    found = detections(adwin, np.concatenate([np.zeros(200), np.full(200, 5.0)]))
    assert found == [223]  # the first check (every 32nd update) after the change
    assert adwin.width == 400 - 224  # restarted on the update after the detection
    assert adwin.estimation == 5.0
    assert adwin.update(5.0) is adwin


def test_ks_pvalue_matches_exact_path_count() -> None:
    # P(D >= h/n) = 2 * sum_j (-1)^(j-1) C(2n, n - j h) / C(2n, n), in exact rationals.
    from fractions import Fraction

    n = 12
    for h in range(1, n + 1):
        terms = sum((-1) ** (j - 1) * math.comb(2 * n, n - j * h) for j in range(1, n // h + 1))
        exact = min(Fraction(2 * terms, math.comb(2 * n, n)), Fraction(1))
        assert ks_two_sided_pvalue(n, h) == pytest.approx(float(exact), rel=1e-12)
    assert ks_two_sided_pvalue(n, 0) == 1.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ADWIN(delta=2), r"delta must be in \(0.0, 1.0\), got 2"),
        (lambda: ADWIN(clock=0), r"clock must be in \[1, inf\), got 0"),
        (lambda: ADWIN(max_buckets=1), r"max_buckets must be in \[2, inf\)"),
        (lambda: PageHinkley(mode="sideways"), r"mode must be one of \['up', 'down', 'both'\], got 'sideways'"),
        (lambda: PageHinkley(threshold=0), r"threshold must be in \(0.0, inf\), got 0"),
        (lambda: PageHinkley(alpha=1.5), r"alpha must be in \(0.0, 1.0\], got 1.5"),
        (lambda: KSWIN(alpha=0), r"alpha must be in \(0.0, 1.0\), got 0"),
        (lambda: KSWIN(window_size=50, stat_size=30), r"window_size must be >= 2 \* stat_size"),
        (lambda: KSWIN(alpha=float("nan")), r"alpha must be in \(0.0, 1.0\), got nan"),
    ],
)
def test_parameters_checked_with_valid_values_in_message(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_drift_config_rejects_bad_detector_and_kswin_sizes() -> None:
    with pytest.raises(ValidationError, match="adwin"):
        DriftConfig(detector="cusum")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="kswin_window_size must be >= 2 \\* kswin_stat_size"):
        DriftConfig(kswin_window_size=100, kswin_stat_size=60)


@pytest.mark.slow  # long seeded streams through river and ours (about 15 s)
def test_agrees_with_river_on_seeded_streams() -> None:
    # river is in the test extras: a missing river fails this test instead of skipping it.
    from river import drift as river_drift

    # Same class name and keyword arguments on both sides.
    settings: list[tuple[str, dict[str, object]]] = [
        ("ADWIN", {}),
        ("ADWIN", {"delta": 0.01, "clock": 1, "grace_period": 30}),
        ("PageHinkley", {}),
        ("PageHinkley", {"mode": "up", "threshold": 20, "delta": 0.05}),
        ("PageHinkley", {"mode": "down", "threshold": 20}),
        ("KSWIN", {"seed": 7}),
    ]
    ours_by_name = {"ADWIN": ADWIN, "PageHinkley": PageHinkley, "KSWIN": KSWIN}
    total = 0
    for seed in range(3):
        rng = random.Random(seed)
        streams = [
            [rng.gauss(0, 1) for _ in range(1500)] + [rng.gauss(0.8, 1) for _ in range(1500)],
            [rng.gauss(0, 1) for _ in range(1500)] + [rng.gauss(0, 3) for _ in range(1500)],
            rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000),
            list(accumulate(rng.gauss(0, 0.1) for _ in range(3000))),
        ]
        for stream in streams:
            for name, kwargs in settings:
                theirs, ours = getattr(river_drift, name)(**kwargs), ours_by_name[name](**kwargs)
                expected = []
                for i, x in enumerate(stream):
                    theirs.update(x)
                    if theirs.drift_detected:
                        expected.append(i)
                assert detections(ours, np.asarray(stream, dtype=float)) == expected
                total += len(expected)
    assert total > 100  # the streams really exercised detections


# -- DriftMonitor ---------------------------------------------------------------

CHANNELS = ["m1/temperature", "m1/vibration"]
STEP = 2000  # grid step at which the monitor streams change


def monitor_streams() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    values = rng.normal(0, 1, (4000, 2)) * [2.0, 0.01] + [20.0, 0.5]  # (T, C), raw sensor units
    residuals = rng.normal(0, 0.3, (4000, 2))  # (T, C), normalised units
    return values, residuals


def run(monitor: DriftMonitor, values: np.ndarray, residuals: np.ndarray | None = None) -> list[tuple[int, str, str]]:
    events = []
    for step in range(len(values)):
        events += [(step, e.channel, e.kind) for e in monitor.update_inputs(values[step], float(step))]
        if residuals is not None:
            events += [(step, e.channel, e.kind) for e in monitor.update_residuals(residuals[step], float(step))]
    return events


@pytest.mark.parametrize("name", DETECTORS)
def test_monitor_stationary_raises_no_drift(name: str) -> None:
    values, residuals = monitor_streams()
    monitor = DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream"))
    assert run(monitor, values, residuals) == []
    assert not monitor.drift_detected
    assert monitor.last_detected is None


@pytest.mark.parametrize(("name", "expected"), [("adwin", 2043), ("page_hinkley", 2048), ("kswin", 2038)])
def test_monitor_input_level_change(name: str, expected: int) -> None:
    values, _ = monitor_streams()
    values[STEP:, 1] += 0.01  # one standard deviation of the vibration channel
    monitor = DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream"))
    assert run(monitor, values) == [(expected, "m1/vibration", "inputs")]
    assert expected - STEP <= MAX_DELAY


@pytest.mark.parametrize(("name", "expected"), [("adwin", 2044), ("page_hinkley", 2029), ("kswin", 2048)])
def test_monitor_input_variance_change(name: str, expected: int) -> None:
    values, _ = monitor_streams()
    values[STEP:, 0] = 20.0 + (values[STEP:, 0] - 20.0) * 3.0  # same mean, 3x the spread
    monitor = DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream"))
    # One event: after it the channel learns the new scale instead of re-alarming.
    assert run(monitor, values) == [(expected, "m1/temperature", "inputs")]
    assert expected - STEP <= MAX_DELAY


@pytest.mark.parametrize(("name", "expected"), [("adwin", 2043), ("page_hinkley", 2045)])
def test_monitor_residual_increase_is_drift_and_decrease_is_not(name: str, expected: int) -> None:
    # KSWIN (alpha 1e-5, 60-value test) does not see residuals doubling; not tested here.
    values, residuals = monitor_streams()
    worse = residuals.copy()
    worse[STEP:, 1] *= 2.0
    monitor = DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream"))
    assert run(monitor, values, worse) == [(expected, "m1/vibration", "residuals")]
    assert monitor.drift_detected and monitor.residual_drift_detected
    better = residuals.copy()
    better[STEP:, 1] *= 0.5
    assert run(DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream")), values, better) == []


@pytest.mark.parametrize("name", ["adwin", "page_hinkley"])
def test_residual_spikes_are_not_drift(name: str) -> None:
    # Short anomalies (a few steps at 30x the usual residual) are alerted as anomalies,
    # not drift: the detector sees them clipped.
    values, residuals = monitor_streams()
    spiky = residuals.copy()
    for at in (900, 1500, 1501, 2500, 3100, 3101, 3102):
        spiky[at, 1] = 30.0 * np.abs(residuals[:, 1]).mean()
    assert run(DriftMonitor(CHANNELS, DriftConfig(detector=name, inputs="stream", residuals="stream")), values, spiky) == []


def test_status_shape_and_json() -> None:
    values, residuals = monitor_streams()
    values[STEP:, 1] += 0.01
    monitor = DriftMonitor(CHANNELS, DriftConfig(inputs="stream", residuals="stream"))
    run(monitor, values[:2100], residuals[:2100])
    status = monitor.status()
    json.dumps(status, allow_nan=False)
    assert set(status) == {"detected", "channels", "last_detected", "detector", "inputs", "residuals", "baseline_since"}
    assert status["detected"] is True and status["detector"] == "adwin"
    assert status["last_detected"] == "1970-01-01T00:34:03.000+00:00"  # step 2043 as unix seconds
    assert status["baseline_since"] is None
    assert list(status["channels"]) == CHANNELS
    vibration = status["channels"]["m1/vibration"]
    assert set(vibration) == {
        "state", "detections", "last_detected", "inputs", "residuals", "residual_level", "residual_baseline", "samples",
    }
    assert vibration["state"] == "drift" and vibration["detections"] == 1
    assert vibration["inputs"] == {"state": "drift", "detections": 1, "last_detected": status["last_detected"]}
    assert vibration["residuals"] == {"state": "stable", "detections": 0, "last_detected": None}
    assert vibration["residual_level"] == pytest.approx(0.3 * math.sqrt(2 / math.pi), rel=0.25)
    assert vibration["residual_baseline"] == pytest.approx(0.3 * math.sqrt(2 / math.pi), rel=0.25)
    # Inputs re-learn their scale for min_samples (60) steps after the drift at 2043.
    assert vibration["samples"] == {"inputs": 2100 - 2044, "residuals": 2100}
    temperature = status["channels"]["m1/temperature"]
    assert temperature["state"] == "stable" and temperature["last_detected"] is None


def test_reset_baseline_after_accepted_adapter() -> None:
    values, residuals = monitor_streams()
    residuals[STEP:, 1] *= 2.0
    monitor = DriftMonitor(CHANNELS, DriftConfig(inputs="stream", residuals="stream"))
    assert run(monitor, values[:2500], residuals[:2500]) == [(2043, "m1/vibration", "residuals")]
    before = monitor.status()["channels"]["m1/vibration"]
    assert before["residual_level"] > 1.5 * before["residual_baseline"]

    monitor.reset_baseline(2500.0)
    after = monitor.status()
    assert after["detected"] is False and monitor.drift_detected is False
    assert after["baseline_since"] is not None
    channel = after["channels"]["m1/vibration"]
    assert channel["state"] == "stable" and channel["residuals"]["state"] == "stable"
    assert channel["detections"] == 1  # history is kept
    assert channel["residual_level"] is None and channel["residual_baseline"] is None
    assert monitor.last_detected == 2043.0

    # The new regime is the new normal: baseline re-learned, no further drift.
    events = []
    for step in range(2500, 4000):
        events += monitor.update_residuals(residuals[step], float(step))
    assert events == []
    channel = monitor.status()["channels"]["m1/vibration"]
    # Baseline: mean |residual| of the first min_samples (60) after the reset.
    assert channel["residual_baseline"] == pytest.approx(np.abs(residuals[2500:2560, 1]).mean(), rel=1e-12)
    assert channel["residual_level"] == pytest.approx(0.6 * math.sqrt(2 / math.pi), rel=0.25)


def test_nan_skipped_and_shape_checked() -> None:
    monitor = DriftMonitor(CHANNELS, DriftConfig(inputs="stream", residuals="stream"))
    monitor.update_inputs(np.array([1.0, np.nan]), 0.0)
    monitor.update_residuals(np.array([np.inf, 0.1]), 0.0)
    samples = {name: ch["samples"] for name, ch in monitor.status()["channels"].items()}
    assert samples == {"m1/temperature": {"inputs": 1, "residuals": 0}, "m1/vibration": {"inputs": 0, "residuals": 1}}
    with pytest.raises(ValueError, match=r"values must have shape \(2,\), got \(3,\)"):
        monitor.update_inputs(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="input_scale needs 2 means and stds"):
        DriftMonitor(CHANNELS, DriftConfig(inputs="stream", residuals="stream"), input_scale=([0.0], [1.0]))
    with pytest.raises(ValueError, match="unique"):
        DriftMonitor(["a/b", "a/b"], DriftConfig(inputs="stream", residuals="stream"))


def test_input_scale_skips_warm_up() -> None:
    values, _ = monitor_streams()
    values[STEP:, 1] += 0.01
    monitor = DriftMonitor(CHANNELS, DriftConfig(inputs="stream", residuals="stream"), input_scale=([20.0, 0.5], [2.0, 0.01]))
    events = run(monitor, values)
    assert [(channel, kind) for _, channel, kind in events] == [("m1/vibration", "inputs")]
    assert 0 <= events[0][0] - STEP <= MAX_DELAY
