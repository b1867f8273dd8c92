"""Level judges: a channel's half-minute medians against the same time of day on earlier days, a
two-sided CUSUM on them; one alert an episode, nothing learnt from a shift, a reason to adapt."""

from __future__ import annotations

import numpy as np
import pytest

from edge_daemon.config import DriftConfig
from edge_daemon.drift.level import LevelJudge, LevelPrior
from edge_daemon.drift.monitor import DriftMonitor

DAY = 3600.0  # a short "day" for the judge alone: 30 slices of 120 s, 4 medians each
CHANNELS = ["m1/temperature", "m1/current"]


def process(days: float, seed: int, start: float = 0.0, period: float = 1.0, day: float = DAY) -> tuple[np.ndarray, np.ndarray]:
    """A line that runs for the second half of every day (current 3 -> 9) with a ripple and noise."""
    rng = np.random.default_rng(seed)
    t = start + np.arange(int(days * day / period)) * period
    phase = (t % day) / day
    level = np.where(phase >= 0.5, 9.0, 3.0) + 0.3 * np.sin(2 * np.pi * 8 * phase)
    return t, level + rng.normal(0.0, 0.2, len(t))


def feed(judge: LevelJudge, t: np.ndarray, x: np.ndarray) -> list[float]:
    return [float(ti) for ti, xi in zip(t, x, strict=True) if judge.update(float(ti), float(xi))]


def test_the_daily_rise_is_not_a_shift_and_an_overload_is_found_in_minutes() -> None:
    judge = LevelJudge(1.0, day_s=DAY)
    t, x = process(12, seed=1)
    assert judge.state == "learning"
    fired = feed(judge, t, x)
    assert fired == [] and judge.state == "watching"  # the line starting every "day" is the time of day, not a shift
    # The overload: current +45% from 70% of day 12 on.
    t, x = process(1, seed=2, start=12 * DAY)
    at = 12 * DAY + 0.7 * DAY
    x[t >= at] *= 1.45
    fired = feed(judge, t, x)
    assert len(fired) == 1 and at < fired[0] <= at + 5 * judge.block_s, fired  # one alert, within five medians
    assert judge.state == "shift" and judge.onset is not None and abs(judge.onset - at) <= 2 * judge.block_s


def test_without_the_time_of_day_the_overload_hides_in_the_daily_swing() -> None:
    """The guard of the slices: one slice for the whole day judges each median against the whole
    day's spread (the line off and on), in which the overload is small."""
    judges = {}
    for bins in (None, 1):
        judge = LevelJudge(1.0, day_s=DAY)
        if bins == 1:  # every time of day in one slice
            judge.bins, judge._bin_s = 1, DAY
            judge._mean, judge._var, judge._days = [0.0], [0.0], [0.0]
        assert feed(judge, *process(6, seed=1)) == []
        t, x = process(1, seed=2, start=6 * DAY)
        at = 6 * DAY + 0.7 * DAY
        x[t >= at] *= 1.45
        judges[bins] = [f for f in feed(judge, t, x) if f - at <= 5 * judge.block_s]
    assert len(judges[None]) == 1 and judges[1] == []


def test_a_prior_lets_it_judge_from_the_first_hour_and_without_one_it_learns_a_day() -> None:
    t0, x0 = process(1, seed=3)  # the store's newest day
    t, x = process(1, seed=4, start=DAY)
    at = DAY + 0.3 * DAY
    x[t >= at] += 3.0
    seeded = LevelJudge(1.0, day_s=DAY)
    seeded.seed(LevelPrior.of(t0, x0, day_s=DAY))
    assert seeded.state == "watching" and seeded.learnt_fraction == 1.0
    fired = feed(seeded, t, x)
    assert len(fired) == 1 and fired[0] - at <= 5 * seeded.block_s
    learning = LevelJudge(1.0, day_s=DAY)
    assert feed(learning, t, x) == [] and learning.learnt_fraction < 1.0


def test_a_shift_teaches_nothing_and_ends_when_the_level_is_back() -> None:
    judge = LevelJudge(1.0, day_s=DAY)
    judge.seed(LevelPrior.of(*process(1, seed=5), day_s=DAY))
    t, x = process(3, seed=6, start=DAY)
    # 0.4 "day" of overload, normal again, and the same overload at the same hours a day later.
    firsts = (1.2 * DAY, 2.2 * DAY)
    for first in firsts:
        x[(t >= first) & (t < first + 0.4 * DAY)] *= 1.45
    fired = feed(judge, t, x)
    # One episode each, the second found as fast as the first: the slices learnt nothing of the
    # first (learnt, it would be part of what is typical at those hours, and its spread).
    assert len(fired) == 2, fired
    assert all(0 < f - first <= 5 * judge.block_s for f, first in zip(fired, firsts, strict=True)), fired
    assert judge.state == "watching"


def test_a_lasting_shift_becomes_the_new_normal_after_a_day() -> None:
    judge = LevelJudge(1.0, day_s=DAY)
    judge.seed(LevelPrior.of(*process(1, seed=7), day_s=DAY))
    t, x = process(4, seed=8, start=DAY)
    at = 1.5 * DAY
    x[t >= at] *= 1.45  # for good
    fired = feed(judge, t, x)
    # One alert; a day later every slice judges by the new level, which is normal from then on.
    assert len(fired) == 1 and fired[0] - at <= 5 * judge.block_s, fired
    assert judge.state == "watching" and judge.learnt_fraction == 1.0


def test_a_channel_constant_while_off_is_not_judged_by_a_spread_of_zero() -> None:
    """A current that reads exactly 0 half the day has a typical slice spread of 0: a floor from
    its daily range keeps a few hundredths of an ampere from reading as a shift."""
    def off_and_on(days: float, start: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        t, x = process(days, seed=seed, start=start)
        running = (t % DAY) / DAY >= 0.7  # off most of the day: the typical slice spread is 0
        return t, np.where(running, x, 0.0)

    judge = LevelJudge(1.0, day_s=DAY)
    judge.seed(LevelPrior.of(*off_and_on(1, 0.0, 13), day_s=DAY))
    t, x = off_and_on(2, DAY, 14)
    x[(t % DAY) / DAY < 0.7] += 0.02  # a sensor offset while off, far under its resolution when on
    assert feed(judge, t, x) == []
    x[(t >= 2.2 * DAY) & (t < 2.6 * DAY)] += 2.0  # it draws current while it should be off: a shift
    judge = LevelJudge(1.0, day_s=DAY)
    judge.seed(LevelPrior.of(*off_and_on(1, 0.0, 13), day_s=DAY))
    assert len(feed(judge, t, x)) == 1


def test_the_monitor_raises_level_drift_dates_it_and_an_accepted_adapter_rebases() -> None:
    cfg = DriftConfig(level_channels=["m1/current"])
    monitor = DriftMonitor(CHANNELS, cfg, period_s=60.0)
    status = monitor.status()["channels"]
    assert "level" not in status["m1/temperature"] and status["m1/current"]["level"]["judging"] == "learning"
    # The store's newest day at one reading a minute: 96 quarter hours of 15 medians.
    t0, x0 = process(1, seed=9, period=60.0, day=86400.0)
    assert monitor.level_block_s == 60.0
    monitor.seed_levels([None, LevelPrior.of(t0, x0, monitor.level_block_s)])
    assert monitor.status()["channels"]["m1/current"]["level"]["judging"] == "watching"
    t, x = process(1, seed=10, start=86400.0, period=60.0, day=86400.0)
    at = 86400.0 + 15 * 3600.0
    x[t >= at] *= 1.45
    events = []
    for ti, xi in zip(t, x, strict=True):
        events += monitor.update_inputs([20.0, xi], float(ti))
    level = [e for e in events if e.kind == "level"]
    assert len(level) == 1 and level[0].channel == "m1/current" and level[0].t - at <= 600, level
    assert level[0].alert()["message"] == "level shift on m1/current" and level[0].alert()["residual_level"] is None
    assert monitor.update_drift_detected and not monitor.residual_drift_detected  # a reason to adapt
    assert monitor.change_from is not None and abs(monitor.change_from - at) <= 180
    channel = monitor.status()["channels"]["m1/current"]
    assert channel["state"] == "drift" and channel["level"]["judging"] == "shift" and channel["level"]["detections"] == 1
    monitor.reset_baseline(float(t[-1]))  # an adapter serves: the shift is no reason to adapt again
    assert not monitor.update_drift_detected and monitor.change_from is None
    # The judge goes on: the shift under way stays one episode (no second alert while it lasts).
    assert monitor.status()["channels"]["m1/current"]["level"]["judging"] == "shift"


def test_an_adapter_accepted_during_a_passing_shift_leaves_no_daily_false_alarm() -> None:
    """An hour of overload, an adapter accepted twenty minutes into it, then normal days: the
    slices learnt nothing of the hour, so its time of day is not a shift on the days after."""
    monitor = DriftMonitor(CHANNELS, DriftConfig(level_channels=["m1/current"]), period_s=60.0)
    t0, x0 = process(1, seed=15, period=60.0, day=86400.0)
    monitor.seed_levels([None, LevelPrior.of(t0, x0, monitor.level_block_s)])
    t, x = process(4, seed=16, start=86400.0, period=60.0, day=86400.0)
    overload = (t >= 86400.0 + 10 * 3600.0) & (t < 86400.0 + 11 * 3600.0)
    x[overload] *= 1.45
    events = []
    for ti, xi in zip(t, x, strict=True):
        if ti == 86400.0 + 10 * 3600.0 + 1200.0:
            monitor.reset_baseline(float(ti))
        events += [e for e in monitor.update_inputs([20.0, xi], float(ti)) if e.kind == "level"]
    assert len(events) == 1 and events[0].t < 86400.0 + 10.5 * 3600.0, [e.t for e in events]
    assert monitor.status()["channels"]["m1/current"]["level"]["judging"] == "watching"


def test_level_channels_must_be_forecast_channels() -> None:
    from edge_daemon.config import parse_config

    data = {
        "device": {"id": "d", "state_dir": "/tmp/x"},
        "mqtt": {"topics": ["sensors/#"]},
        "channels": {"names": CHANNELS, "inputs_only": ["m1/temperature"]},
        "drift": {"level_channels": ["m1/temperature"]},
    }
    with pytest.raises(Exception, match="level_channels"):
        parse_config(data)


def test_a_daemon_judges_levels_from_its_stored_day_and_alerts_an_overload(tmp_path, broker) -> None:  # noqa: ANN001
    """A real daemon and broker, one reading a minute: at start its level judge starts from the
    day the store holds (without it: a day of learning), and an overload is a `level` drift alert."""
    import json
    import time
    import uuid

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_daemon.control.client import request
    from edge_daemon.daemon import Daemon
    from edge_daemon.store import Reading, ReplayStore
    from tests.conftest import make_config, start_daemon
    from tests.support import AlertSubscriber, wait_for

    names = ["m1/temperature", "m1/vibration", "m1/current"]
    config = make_config(tmp_path, port=broker.port, channels={"names": names, "period_s": 60.0}, drift={"level_channels": ["m1/current"]})
    now = float(int(time.time()) // 60 * 60)
    start = now - 4 * 3600.0  # published: the last four hours, the overload in the last two
    t0, current = process(1, seed=11, start=start - 86400.0, period=60.0, day=86400.0)
    store = ReplayStore(config.store_path, config.store, names)
    store.write([Reading(name, float(t), value) for t, c in zip(t0, current, strict=True)
                 for name, value in zip(names, (20.0, 0.5, float(c)), strict=True)])  # fmt: skip
    store.close()
    alerts = AlertSubscriber(broker.port)
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        level = request(config.device.socket, {"cmd": "status"})["drift"]["channels"]["m1/current"]["level"]
        assert level["judging"] == "watching" and level["time_of_day_learnt"] == 1.0, level
        t, x = process(4 / 24, seed=12, start=start, period=60.0, day=86400.0)
        at = start + 2 * 3600.0
        x[t >= at] *= 1.45
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"overload-{uuid.uuid4().hex[:8]}")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        sent = [client.publish("sensors/m1", json.dumps({"ts": float(ti), "values": {"temperature": 20.0, "vibration": 0.5, "current": float(xi)}}), qos=1)
                for ti, xi in zip(t, x, strict=True)]  # fmt: skip
        for info in sent:
            info.wait_for_publish(60)
        client.loop_stop()
        client.disconnect()
        alert = wait_for(lambda: next((a for a in alerts.received if a.get("type") == "drift" and a.get("kind") == "level"), None),
                         120, "the level drift alert", detail=lambda: alerts.received)  # fmt: skip
        assert alert["channel"] == "m1/current" and at < alert["ts"] <= at + 600, alert
        assert not any(a.get("kind") == "level" and a["ts"] < at for a in alerts.received if a.get("type") == "drift")
        level = request(config.device.socket, {"cmd": "status"})["drift"]["channels"]["m1/current"]["level"]
        assert level["judging"] == "shift" and level["detections"] == 1 and level["change_from"] is not None, level
    finally:
        daemon.stop()
        alerts.close()
