"""CUSUM on seeded streams (exact detection indices, bounded delay after an
N-sigma shift, silence on a long stationary stream, spikes ignored, restart
and re-learning) and its place in DriftMonitor beside the day-long residual
window: an abrupt residual shift on one channel is one residual drift event,
within minutes, and the window confirming it later adds no second alert.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from edge_daemon.config import DriftConfig
from edge_daemon.drift import CUSUM, DriftMonitor
from edge_daemon.drift.profile import TimeOfDayProfile

SHIFT_AT = 5000  # index of the first value of the shifted regime


def detections(detector: CUSUM, stream: np.ndarray) -> list[int]:
    return [i for i, x in enumerate(stream.tolist()) if detector.update(x).drift_detected]


def half_normal(n: int, seed: int) -> np.ndarray:
    """|N(0, 1)|: what the monitor feeds, the magnitude of a white residual."""
    return np.abs(np.random.default_rng(seed).normal(0.0, 1.0, n))


# -- the detector ---------------------------------------------------------------


def test_long_stationary_stream_raises_nothing() -> None:
    # 200,000 values: more than two days at 1 s, with the daemon's defaults.
    cfg = DriftConfig()
    detector = CUSUM(k=cfg.cusum_k, h=cfg.cusum_h, warmup=cfg.cusum_warmup_steps)
    assert detections(detector, half_normal(200_000, seed=3)) == []
    assert not detector.learning and detector.mean == pytest.approx(np.sqrt(2 / np.pi), rel=0.05)


@pytest.mark.parametrize(("sigmas", "expected"), [(1.0, 5052), (2.0, 5018), (4.0, 5006)])
def test_level_shift_of_n_sigma_detected_within_bound(sigmas: float, expected: int) -> None:
    rng = np.random.default_rng(4)
    stream = rng.normal(10.0, 0.5, 2 * SHIFT_AT)  # any scale: the detector standardises
    stream[SHIFT_AT:] += sigmas * 0.5
    detector = CUSUM(k=0.5, h=20.0, warmup=1000)
    found = detections(detector, stream)
    assert found[0] == expected
    # A sustained shift of d sigma adds d - k a step (the shift is clipped at `clip`).
    assert found[0] - SHIFT_AT <= 20.0 / (min(sigmas, 3.0) - 0.5) * 1.5


def test_upward_only_by_default_and_both_ways_on_request() -> None:
    rng = np.random.default_rng(5)
    stream = rng.normal(0.0, 1.0, 2 * SHIFT_AT)
    stream[SHIFT_AT:] -= 2.0
    assert detections(CUSUM(k=0.5, h=20.0, warmup=1000), stream) == []
    assert detections(CUSUM(k=0.5, h=20.0, warmup=1000, mode="both"), stream)[0] == 5011


def test_short_spikes_are_not_a_shift() -> None:
    # A spike counts as at most clip - k a step: three steps at 50 sigma add 7.5, not 20.
    stream = half_normal(20_000, seed=6)
    for start in range(3000, 20_000, 1500):
        stream[start : start + 3] = 50.0
    detector = CUSUM(k=0.5, h=20.0, warmup=1000)
    assert detections(detector, stream) == []
    assert detector.mean < 1.0  # the spikes barely moved the running estimate either


def test_onset_dates_the_shift_when_it_is_detected() -> None:
    rng = np.random.default_rng(4)
    stream = rng.normal(10.0, 0.5, 2 * SHIFT_AT)
    stream[SHIFT_AT:] += 1.0  # 2 sigma
    detector = CUSUM(k=0.5, h=20.0, warmup=1000)
    found = detections(detector, stream[:5019])  # up to the detection: the next value restarts it
    assert found == [5018]
    # Page's estimate: the sum that fired last left zero at the shift, give or take the few steps
    # of noise that may have started it just before (here it began 6 steps early).
    assert found[0] - detector.onset_steps + 1 == 4994


def test_update_returns_self_and_relearns_after_a_detection() -> None:
    stream = np.concatenate([half_normal(3000, seed=7), 3.0 * half_normal(6000, seed=8)])
    detector = CUSUM(k=0.5, h=20.0, warmup=1000)
    assert detector.update(0.5) is detector
    detector.reset()
    found = detections(detector, stream)
    # One detection: afterwards the detector learns the tripled level as the new normal.
    assert found == [3007]
    assert detector.samples == len(stream) - 3008 and not detector.learning  # restarted on the update after it
    assert detector.mean == pytest.approx(3.0 * np.sqrt(2 / np.pi), rel=0.1)


def test_silent_while_learning_and_statistic_reported() -> None:
    detector = CUSUM(k=0.5, h=5.0, warmup=100)
    for x in half_normal(100, seed=9).tolist():
        assert not detector.update(x).drift_detected
        assert detector.statistic == 0.0
    assert not detector.learning
    detector.update(detector.mean + 3.0 * detector.std)
    assert detector.statistic == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CUSUM(k=-1), r"k must be in \[0.0, inf\), got -1"),
        (lambda: CUSUM(h=0), r"h must be in \(0.0, inf\), got 0"),
        (lambda: CUSUM(warmup=1), r"warmup must be in \[2, inf\), got 1"),
        (lambda: CUSUM(mode="sideways"), r"mode must be one of \['up', 'down', 'both'\], got 'sideways'"),
        (lambda: CUSUM(k=3.0, clip=3.0), r"k must be below clip"),
    ],
)
def test_parameters_checked_with_valid_values_in_message(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_config_fields_checked() -> None:
    with pytest.raises(ValidationError, match="cusum_h"):
        DriftConfig(cusum_h=0)
    with pytest.raises(ValidationError, match="cusum_warmup_steps"):
        DriftConfig(cusum_warmup_steps=1)


# -- in the monitor ---------------------------------------------------------------

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]
DAY_STEPS = 20_000  # the residual window: long against the CUSUM's minutes


def monitor_residuals(n: int, seed: int) -> np.ndarray:
    """(n, 3) normalised residuals of three channels on different scales, heavy-tailed."""
    return np.random.default_rng(seed).standard_t(5, (n, 3)) * [0.02, 0.3, 0.1]


def residual_events(monitor: DriftMonitor, residuals: np.ndarray) -> list[tuple[int, str]]:
    events = []
    for step in range(len(residuals)):
        events += [(step, e.channel) for e in monitor.update_residuals(residuals[step], float(step)) if e.kind == "residuals"]
    return events


def cfg(**changes: object) -> DriftConfig:
    """The CUSUM on every residual, with no daily swing: judged by its own running level, not by the time of day."""
    settings = {"cusum": True, "cusum_k": 0.5, "cusum_h": 20.0, "cusum_warmup_steps": 1000, "cusum_block_s": 1.0, "cusum_by_time_of_day": False}
    return DriftConfig(residual_window_s=DAY_STEPS, **{**settings, **changes})


def test_abrupt_residual_shift_on_one_channel_is_one_event_within_minutes() -> None:
    shift_at = 30_000  # after the window's baseline (the first 20,000 steps)
    residuals = monitor_residuals(80_000, seed=10)
    residuals[shift_at:, 2] *= 3.0
    monitor = DriftMonitor(CHANNELS, cfg())
    events = residual_events(monitor, residuals)
    # One alert: the CUSUM's, 22 steps after the shift; the window crosses 2x over
    # 10,000 steps later, in the same episode, and stays quiet.
    assert events == [(30_022, "m1/current")]
    current = monitor.status()["channels"]["m1/current"]
    assert current["residual_window"]["ratio"] > 2.0  # the window did see it too
    assert current["residuals"] == {"state": "drift", "detections": 1, "last_detected": "1970-01-01T08:20:22.000+00:00"}
    assert current["residual_cusum"]["state"] == "watching" and current["residual_cusum"]["threshold"] == 20.0

    # The CUSUM dates the shift: its sum last left zero a few steps after it began. An update
    # trains on the data from there on.
    assert shift_at - 10 <= monitor.residual_change_from <= shift_at + 10, monitor.residual_change_from

    # Without the CUSUM only the window sees it, thousands of steps later, and can only say the
    # change lies within the window.
    slow_monitor = DriftMonitor(CHANNELS, cfg(cusum=False))
    slow = residual_events(slow_monitor, residuals)
    assert slow == [(40_383, "m1/current")]
    assert slow_monitor.residual_change_from == 40_383 - DAY_STEPS


def test_stationary_residuals_raise_nothing_and_episodes_rearm() -> None:
    residuals = monitor_residuals(90_000, seed=11)
    assert residual_events(DriftMonitor(CHANNELS, cfg()), residuals) == []
    # Two abrupt shifts, the second after the first one's episode is over (the level is
    # back, and a whole window after it began the window's ratio is under its re-arm mark):
    # two alerts.
    residuals[25_000:26_000, 1] *= 4.0
    residuals[70_000:, 1] *= 4.0
    events = residual_events(DriftMonitor(CHANNELS, cfg()), residuals)
    assert events == [(25_008, "m1/vibration"), (70_011, "m1/vibration")]


def test_an_accepted_adapter_restarts_the_cusum() -> None:
    residuals = monitor_residuals(40_000, seed=12)
    residuals[30_000:, 0] *= 3.0
    monitor = DriftMonitor(CHANNELS, cfg())
    assert residual_events(monitor, residuals[:31_000]) == [(30_016, "m1/temperature")]
    assert monitor.residual_change_from is not None
    monitor.reset_baseline(31_000.0)
    assert monitor.residual_change_from is None
    status = monitor.status()["channels"]["m1/temperature"]["residual_cusum"]
    assert status == {"statistic": 0.0, "threshold": 20.0, "state": "learning", "samples": 0}
    assert not monitor.residual_drift_detected
    # The adapter's level (here: unchanged tripled residuals) is the new normal.
    assert residual_events(monitor, residuals[31_000:]) == []


def test_stream_mode_and_cusum_off_run_no_cusum() -> None:
    for config in (DriftConfig(residuals="stream"), DriftConfig(cusum=False)):
        status = DriftMonitor(CHANNELS, config).status()["channels"]["m1/current"]
        assert "residual_cusum" not in status


# -- judged by the time of day -------------------------------------------------------

DAY = 86_400  # steps of a day at 1 reading/s


def daily_residuals(days: int, seed: int) -> np.ndarray:
    """(days * DAY, 3) heavy-tailed residuals three times as large from 06:00 to 22:00 as at night,
    as a model trained on a night shift makes them when the line runs by day."""
    hour = np.arange(days * DAY) % DAY / 3600
    size = np.where((hour >= 6) & (hour < 22), 5.0, 1.0)
    return monitor_residuals(days * DAY, seed) * size[:, None]


def test_the_profile_learns_a_whole_day_then_judges_each_value_against_its_time_of_day() -> None:
    assert TimeOfDayProfile(1.0).bins == 96 and TimeOfDayProfile(60.0).bins == 24 and TimeOfDayProfile(600.0).bins == 2
    profile = TimeOfDayProfile(60.0)
    for k in range(1440):  # a day at 1 reading a minute: 1 by night, 3 from 06:00 to 22:00
        t = 1.7e9 - 1.7e9 % DAY + 60.0 * k
        assert profile.relative(t, 1.0) is None  # nothing is judged before every hour has been seen whole
        profile.learn(t, 3.0 if 6 <= k / 60 < 22 else 1.0)
    assert not profile.ready  # the last hour is learnt once it is over
    midnight = 1.7e9 - 1.7e9 % DAY + DAY
    assert profile.relative(midnight + 3 * 3600, 2.0) == pytest.approx(2.0)
    assert profile.ready
    assert profile.relative(midnight + 12 * 3600, 6.0) == pytest.approx(2.0)


def test_a_slice_learns_its_values_once_it_is_over_so_a_shift_is_not_judged_against_itself() -> None:
    profile = TimeOfDayProfile(1.0)  # quarter hours
    midnight = 1.7e9 - 1.7e9 % DAY
    profile.seed([1.0] * 24)  # a prior's typical value, counted as a day: as after start-up
    for k in range(899):  # the residuals treble at 07:00 and stay so for the quarter hour
        t = midnight + 7 * 3600 + k
        assert profile.relative(t, 3.0) == pytest.approx(3.0)  # judged against the prior all along
        profile.learn(t, 3.0)
    assert profile.typical(midnight + 7 * 3600) == pytest.approx(1.0)
    profile.learn(midnight + 7 * 3600 + 899, 3.0)
    # Once it is over, the quarter hour refines its slice half-way (a day's values on a day's), and
    # the next quarter hour's slice is untouched.
    assert profile.relative(midnight + 7 * 3600 + 900, 3.0) == pytest.approx(3.0)
    assert profile.typical(midnight + 7 * 3600) == pytest.approx(2.0)


def test_the_daily_swing_of_the_residuals_is_not_a_shift_and_an_abrupt_one_is_found_in_minutes() -> None:
    residuals = daily_residuals(4, seed=13)
    # Judged by its own last hour, every morning's rise reads as a shift.
    by_the_hour = residual_events(DriftMonitor(CHANNELS, DriftConfig(cusum=True, cusum_by_time_of_day=False)), residuals)
    assert len(by_the_hour) >= 3, by_the_hour
    # Judged against the same time of day on earlier days (the default), it does not.
    monitor = DriftMonitor(CHANNELS, DriftConfig(cusum=True))
    assert residual_events(monitor, residuals) == []
    assert monitor.status()["channels"]["m1/current"]["residual_cusum"]["time_of_day_learnt"] == 1.0
    # An abrupt shift on day 3 at 10:00 (current residuals x 3) is found within the 10 minutes the
    # CUSUM's settings allow at the fastest (h / (clip - k) = 15 means of 30 s).
    shift_at = 3 * DAY + 10 * 3600
    residuals[shift_at:, 2] *= 3.0
    events = residual_events(DriftMonitor(CHANNELS, DriftConfig(cusum=True)), residuals)
    assert len(events) == 1 and events[0][1] == "m1/current" and 450 <= events[0][0] - shift_at < 600, events


def test_the_cusum_waits_for_a_whole_day_of_residuals() -> None:
    monitor = DriftMonitor(CHANNELS, DriftConfig(cusum=True))
    residuals = daily_residuals(1, seed=14)
    residuals[12 * 3600 :, 0] *= 5.0  # a shift before a day is learnt: the CUSUM cannot judge it
    assert residual_events(monitor, residuals[: DAY // 2 + 3600]) == []  # the day-long window has no baseline yet either
    status = monitor.status()["channels"]["m1/temperature"]["residual_cusum"]
    assert status["state"] == "learning" and status["samples"] == 0 and 0.5 < status["time_of_day_learnt"] < 1.0
