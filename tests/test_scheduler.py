"""Idle detection and the update trigger, with a controllable clock and CPU reading."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from edge_daemon.config import TrainConfig
from edge_daemon.adaptation.trigger import IdleDetector, TriggerInputs, UpdateTrigger
from edge_daemon.memory.pressure import Level
from edge_daemon.training.records import AdapterMeta, resets_drift_baseline
from edge_daemon.scheduler import JobScheduler

# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def calm(**overrides: object) -> TriggerInputs:
    values: dict = dict(idle=True, memory_level=Level.NORMAL, backlog=0, drift_detected=False, new_windows=0, has_base=True)
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


def test_idle_threshold_of_100_counts_a_saturated_device_as_idle() -> None:
    clock = FakeClock()
    idle = IdleDetector(cpu_threshold=100, window_s=10, clock=clock, cpu_reader=lambda: 100.0)
    for _ in range(3):
        idle.sample()
        clock.now += 5
    assert idle.cpu_percent == 100.0 and idle.idle()
    strict = IdleDetector(cpu_threshold=99.9, window_s=10, clock=clock, cpu_reader=lambda: 100.0)
    for _ in range(3):
        strict.sample()
        clock.now += 5
    assert not strict.idle()


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
    assert trigger.decide(calm(drift_detected=True, memory_level=Level.CRITICAL)).reason == "memory level critical"
    assert trigger.decide(calm(drift_detected=True, memory_level=Level.HIGH)).start  # with room for the worker
    assert "backlog" in trigger.decide(calm(drift_detected=True, backlog=5000)).reason
    assert trigger.decide(calm(drift_detected=True, has_base=False)).reason == "no base model yet"
    short = trigger.decide(calm(drift_detected=True, headroom_mb=-120.4))
    assert not short.start and short.reason == "not enough memory for the training worker (120 MB short)"
    assert trigger.decide(calm(drift_detected=True, headroom_mb=5.0)).start


def test_start_on_limits_the_reasons_that_start_an_update() -> None:
    clock = FakeClock()
    every = calm(drift_detected=True, new_windows=500)
    only_requests = UpdateTrigger(TrainConfig(min_interval_s=0, min_new_windows=100, start_on=["request"]), clock=clock)
    assert only_requests.decide(every).reason == "no reason to adapt"
    assert only_requests.request()
    assert only_requests.decide(every).reason == "requested"
    no_requests = UpdateTrigger(TrainConfig(min_interval_s=0, min_new_windows=100, start_on=["drift", "new_data"]), clock=clock)
    assert not no_requests.request() and not no_requests.requested
    assert no_requests.decide(every).reason == "drift detected"
    new_data = UpdateTrigger(TrainConfig(min_interval_s=0, min_new_windows=100, start_on=["new_data"]), clock=clock)
    assert new_data.decide(every).reason == "500 new windows"
    assert new_data.decide(calm(drift_detected=True)).reason == "no reason to adapt"
    with pytest.raises(ValueError, match="start_on"):
        TrainConfig(start_on=["weather"])  # type: ignore[list-item]


def test_only_a_routine_update_keeps_the_drift_references() -> None:
    # Updates every few hours on new data must not keep a day-long drift window learning for
    # ever; after drift, a request or a rollback the references are learnt again.
    trigger = UpdateTrigger(TrainConfig(min_interval_s=0, min_new_windows=100), clock=FakeClock())
    routine = trigger.decide(calm(new_windows=250))
    assert routine.start and routine.reason == "250 new windows"
    assert not resets_drift_baseline(routine.cause)
    assert resets_drift_baseline(trigger.decide(calm(new_windows=250, drift_detected=True)).cause)
    trigger.request()
    assert resets_drift_baseline(trigger.decide(calm(new_windows=250)).cause)
    assert resets_drift_baseline(None)


def test_an_adapter_from_before_causes_were_recorded_is_judged_by_its_reason() -> None:
    assert AdapterMeta(reason="250 new windows").update_cause == "new_data"
    assert AdapterMeta(reason="drift detected").update_cause == "drift"
    assert AdapterMeta(reason="requested").update_cause == "request"
    assert AdapterMeta(reason="a reason no version wrote").update_cause is None
    assert AdapterMeta(reason="250 new windows", cause="drift").update_cause == "drift"
    assert AdapterMeta.from_json(AdapterMeta(reason="x", cause="new_data").to_json()).update_cause == "new_data"


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


def wait_until(predicate: Callable[[], object], what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def test_job_scheduler_coalesces_and_survives_failing_jobs() -> None:
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_SUBMITTED

    interval = 0.1
    scheduler = JobScheduler()
    # apscheduler's decision at each due time of the slow job: started (with the run times it
    # stands for) or skipped because it was still running.
    decisions: list[tuple[int, list]] = []
    scheduler._scheduler.add_listener(
        lambda event: decisions.append((event.code, list(event.scheduled_run_times))) if event.job_id == "slow" else None,
        EVENT_JOB_SUBMITTED | EVENT_JOB_MAX_INSTANCES,
    )
    runs: list[float] = []
    running = threading.Lock()
    overlaps = []
    release = threading.Event()
    failures = [0]

    def slow_job() -> None:
        if not running.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            runs.append(time.monotonic())
            if len(runs) == 1:
                release.wait(HANG_S)  # the first run lasts over many of its due times
        finally:
            running.release()

    def failing_job() -> None:
        failures[0] += 1
        if failures[0] <= 3:  # a few failures, then it works: a job that always fails is dead (test_liveness)
            raise RuntimeError("boom")

    def skipped() -> int:
        return sum(code == EVENT_JOB_MAX_INSTANCES for code, _ in decisions)

    scheduler.add("slow", slow_job, interval_s=interval, run_now=True)
    scheduler.add("failing", failing_job, interval_s=interval, run_now=True)
    scheduler.start()
    try:
        # Due times come while the first run goes on: each is skipped, none starts a second run.
        wait_until(lambda: skipped() >= 3 or overlaps, "due times of the slow job skipped while it ran")
        assert len(runs) == 1 and not overlaps
        release.set()
        wait_until(lambda: len(runs) >= 2, "the slow job to run again after its long run")
        # Suspended for several intervals (as a device that slept), then resumed: the due times
        # missed meanwhile are caught up with one run, not a queue of them.
        scheduler._scheduler.pause()
        time.sleep(6 * interval)  # at least this long; longer only misses more due times
        scheduler._scheduler.resume()

        def caught_up() -> bool:
            times = [run_times[-1] for _, run_times in decisions]
            return any((b - a).total_seconds() >= 3 * interval for a, b in zip(times, times[1:]))

        wait_until(caught_up, "the slow job's first run after the pause")
        wait_until(lambda: failures[0] >= 4, "the failing job to have failed three times, then run")
        assert scheduler.alive
    finally:
        release.set()
        scheduler.stop()
    assert not overlaps
    assert all(len(run_times) == 1 for _, run_times in decisions), decisions
    assert {"slow", "failing"} <= set(scheduler.heartbeats())
