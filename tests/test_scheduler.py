"""Idle detection and the update trigger, with a controllable clock and CPU reading."""

from __future__ import annotations

import threading
import time

import pytest

from edge_daemon.config import TrainConfig
from edge_daemon.scheduler import IdleDetector, JobScheduler, TriggerInputs, UpdateTrigger, resets_drift_baseline


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def calm(**overrides: object) -> TriggerInputs:
    values: dict = dict(idle=True, memory_level="normal", backlog=0, drift_detected=False, new_windows=0, has_base=True)
    values.update(overrides)
    return TriggerInputs(**values)


def test_idle_needs_a_full_window_below_threshold() -> None:
    clock = FakeClock()
    cpu = [10.0]
    idle = IdleDetector(cpu_threshold=50, window_s=30, clock=clock, cpu_reader=lambda: cpu[0])
    for _ in range(5):  # 20 s observed: not yet a whole window
        idle.sample()
        clock.now += 5
    assert not idle.idle()
    for _ in range(3):
        idle.sample()
        clock.now += 5
    assert idle.idle()
    cpu[0] = 95.0  # a burst of load pulls the 30 s mean above 50%
    for _ in range(4):
        idle.sample()
        clock.now += 5
    assert idle.cpu_percent is not None and idle.cpu_percent > 50
    assert not idle.idle()
    cpu[0] = 5.0  # old busy samples age out of the window
    for _ in range(7):
        idle.sample()
        clock.now += 5
    assert idle.idle()


def test_idle_detector_checks_parameters() -> None:
    with pytest.raises(ValueError, match="cpu_threshold"):
        IdleDetector(cpu_threshold=0, window_s=10)
    with pytest.raises(ValueError, match="window_s"):
        IdleDetector(cpu_threshold=50, window_s=0)


def test_trigger_needs_a_reason_and_idle() -> None:
    clock = FakeClock()
    trigger = UpdateTrigger(TrainConfig(min_interval_s=600, min_new_windows=100), clock=clock)
    assert trigger.decide(calm()).reason == "no reason to adapt"
    assert trigger.decide(calm(new_windows=100)).start
    assert trigger.decide(calm(drift_detected=True)).reason == "drift detected"
    assert not trigger.decide(calm(drift_detected=True, idle=False)).start
    assert trigger.decide(calm(drift_detected=True, memory_level="elevated")).reason == "memory level elevated"
    assert "backlog" in trigger.decide(calm(drift_detected=True, backlog=5000)).reason
    assert trigger.decide(calm(drift_detected=True, has_base=False)).reason == "no base model yet"
    short = trigger.decide(calm(drift_detected=True, headroom_mb=-120.4))
    assert not short.start and short.reason == "not enough memory for the training child (120 MB short)"
    assert trigger.decide(calm(drift_detected=True, headroom_mb=5.0)).start


def test_only_a_routine_update_keeps_the_drift_references() -> None:
    # Updates every few hours on new data must not keep a day-long drift window learning for
    # ever; after drift, a request or a rollback the references are learnt again.
    trigger = UpdateTrigger(TrainConfig(min_interval_s=0, min_new_windows=100), clock=FakeClock())
    routine = trigger.decide(calm(new_windows=250))
    assert routine.start and routine.reason == "250 new windows"
    assert not resets_drift_baseline(routine.reason)
    assert resets_drift_baseline(trigger.decide(calm(new_windows=250, drift_detected=True)).reason)
    trigger.request()
    assert resets_drift_baseline(trigger.decide(calm(new_windows=250)).reason)
    assert resets_drift_baseline(None)


def test_trigger_spacing_single_flight_and_requests() -> None:
    clock = FakeClock()
    trigger = UpdateTrigger(TrainConfig(min_interval_s=600), clock=clock)
    assert trigger.decide(calm(drift_detected=True)).start
    trigger.started()
    assert trigger.decide(calm(drift_detected=True)).reason == "an update is running"
    clock.now += 60
    trigger.finished()
    decision = trigger.decide(calm(drift_detected=True))
    assert not decision.start and "min 600s" in decision.reason
    # An operator's request skips the spacing but still waits for idle.
    trigger.request()
    assert not trigger.decide(calm(idle=False)).start
    assert trigger.decide(calm()).reason == "requested"
    trigger.started()
    assert not trigger.requested
    trigger.finished()
    clock.now += 600
    assert trigger.decide(calm(drift_detected=True)).start


def test_trigger_backs_off_after_a_memory_stop() -> None:
    clock = FakeClock()
    trigger = UpdateTrigger(TrainConfig(min_interval_s=0), clock=clock)
    trigger.started()
    trigger.finished(stopped_for_memory=True, backoff_s=120)
    assert "backing off" in trigger.decide(calm(drift_detected=True)).reason
    clock.now += 121
    assert trigger.decide(calm(drift_detected=True)).start


def test_job_scheduler_coalesces_and_survives_failing_jobs() -> None:
    scheduler = JobScheduler()
    runs: list[float] = []
    running = threading.Lock()
    overlaps = []

    def slow_job() -> None:
        if not running.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            runs.append(time.monotonic())
            time.sleep(0.35)  # longer than its interval: apscheduler must not overlap it
        finally:
            running.release()

    def failing_job() -> None:
        raise RuntimeError("boom")

    scheduler.add("slow", slow_job, interval_s=0.1, run_now=True)
    scheduler.add("failing", failing_job, interval_s=0.1, run_now=True)
    scheduler.start()
    time.sleep(1.2)
    assert scheduler.alive
    scheduler.stop()
    assert not overlaps
    assert 2 <= len(runs) <= 4  # ~1.2 s / 0.35 s, missed runs coalesced rather than queued
    assert {"slow", "failing"} <= set(scheduler.heartbeats())
