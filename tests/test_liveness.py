"""No half-alive parts: scoring and background jobs that keep failing, or stop moving, count as
dead, and so does a control server nobody can reach (the daemon then exits non-zero for the
service manager to restart it). The memory watchdog's liveness is tested in test_watchdog.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edge_daemon import pipeline as pipeline_module
from edge_daemon.config import Config
from edge_daemon.daemon import Daemon
from edge_daemon.pipeline import MAX_FAILURES_IN_A_ROW, ScoringPipeline
from edge_daemon.scheduler import JobScheduler
from edge_daemon.store import Reading
from conftest import make_config
from tests.support import wait_for

HANG_S = 60.0


def test_scoring_that_fails_batch_after_batch_is_dead_and_one_success_resets_the_count(tmp_path: Path) -> None:
    pipeline = ScoringPipeline(make_config(tmp_path), publish=lambda *args: None)
    pipeline.start()
    try:
        bad = [("m1/temperature",)]  # not a reading: the batch fails to score
        good = [Reading("m1/temperature", 1_800_000_000.0, 1.0)]
        for _ in range(MAX_FAILURES_IN_A_ROW - 1):
            pipeline.on_batch(bad)  # type: ignore[arg-type]
        wait_for(lambda: pipeline.failures == MAX_FAILURES_IN_A_ROW - 1, HANG_S, "the failures counted")
        pipeline.on_batch(good)
        wait_for(lambda: pipeline.failures == 0, HANG_S, "a good batch to reset the count")
        assert pipeline.alive
        for _ in range(MAX_FAILURES_IN_A_ROW):
            pipeline.on_batch(bad)  # type: ignore[arg-type]
        wait_for(lambda: not pipeline.alive, HANG_S, "scoring to count as dead")
        assert pipeline.status()["failures_in_a_row"] == MAX_FAILURES_IN_A_ROW
    finally:
        pipeline.stop()


def test_a_job_that_fails_run_after_run_kills_the_scheduler() -> None:
    scheduler = JobScheduler(max_failures=3)
    runs = [0]

    def failing() -> None:
        runs[0] += 1
        raise RuntimeError("boom")

    scheduler.add("failing", failing, interval_s=0.05, run_now=True)
    scheduler.start()
    try:
        wait_for(lambda: not scheduler.alive, HANG_S, "the scheduler to count as dead")
        assert runs[0] >= 3 and scheduler.dead_jobs() == [f"failing (failed {runs[0]} runs in a row)"]
    finally:
        scheduler.stop()


def test_a_wedged_job_kills_the_scheduler_until_it_moves_again() -> None:
    scheduler = JobScheduler(stale_grace_s=0.2)
    release = threading.Event()
    started = threading.Event()

    def wedged() -> None:
        started.set()
        release.wait(HANG_S)

    scheduler.add("wedged", wedged, interval_s=0.05, run_now=True)
    scheduler.start()
    try:
        assert started.wait(HANG_S)
        wait_for(lambda: not scheduler.alive, HANG_S, "the wedged job to count as dead")
        assert scheduler.dead_jobs()[0].startswith("wedged (stuck for ")
        release.set()
        wait_for(lambda: scheduler.alive, HANG_S, "the job to move again")
    finally:
        release.set()
        scheduler.stop()


def test_a_scoring_thread_that_stops_beating_is_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "STALE_S", 0.3)
    pipeline = ScoringPipeline(make_config(tmp_path), publish=lambda *args: None)
    pipeline.start()
    try:
        assert pipeline.alive
        with pipeline._lock:  # each step takes it: the thread is stuck in its first step
            pipeline.on_batch([Reading("m1/temperature", 1_800_000_000.0, 1.0), Reading("m1/temperature", 1_800_000_002.0, 2.0)])
            wait_for(lambda: not pipeline.alive, HANG_S, "the stuck scoring thread to count as dead")
        wait_for(lambda: pipeline.alive, HANG_S, "scoring to beat again")
        assert pipeline.steps > 0
    finally:
        pipeline.stop()


def test_removing_the_control_socket_under_a_running_daemon_kills_its_control_part(config: Config) -> None:
    daemon = Daemon(config)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(daemon.run()), name="daemon-under-test")
    runner.start()
    try:
        wait_for(lambda: daemon.heartbeat is not None, HANG_S, "the daemon to be ready")
        control = daemon.parts["control"]
        assert control.alive
        config.device.socket.unlink()
        assert not control.alive
        # The main loop finds it dead at its next check and run() returns non-zero.
        runner.join(HANG_S)
        assert not runner.is_alive()
    finally:
        daemon.stop_event.set()
        runner.join(HANG_S)
    assert codes == [1]
