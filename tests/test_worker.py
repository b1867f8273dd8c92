"""Training workers forked from the helper: messages, exit status, OOM score, shared state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_daemon.memory.pressure import Level, SharedLevel
from edge_daemon.training.worker import MessageWriter, SharedFlag, WorkerForker, read_messages

HANG_S = 120.0  # bounds a hang only


def report(job: dict[str, Any], out: MessageWriter, level: SharedLevel, stop: SharedFlag) -> None:
    """Says what it sees, then waits for the daemon's stop flag if asked to."""
    with open("/proc/self/oom_score_adj") as handle:
        oom = int(handle.read())
    out.put({"pid": os.getpid(), "ppid": os.getppid(), "oom_score_adj": oom, "level": level.get().label, "job": job})
    if job.get("wait_for_stop"):
        # Polls the shared flag as the trainer does at every micro-batch boundary.
        while not stop.is_set():
            time.sleep(0.001)
        out.put({"stop_seen": True})
    if job.get("import"):
        out.put({"new_modules": sorted(set(sys.modules) - set(job["before"]))})
    out.close()


def hang(job: Any, out: MessageWriter, level: SharedLevel, stop: SharedFlag) -> None:
    out.put({"pid": os.getpid()})
    while True:
        signal.pause()  # until killed


@pytest.fixture
def forker() -> Iterator[WorkerForker]:
    made = WorkerForker()
    made.register("report", report)
    made.register("hang", hang)
    made.start()
    try:
        yield made
    finally:
        made.stop()


def test_a_worker_reports_through_its_pipe_and_its_exit_through_the_helper(forker: WorkerForker) -> None:
    assert forker.alive
    forker.level.set(Level.HIGH)  # after the fork: the worker reads the daemon's live value
    pid, fd = forker.launch("report", {"n": 1})
    (message,) = list(read_messages(fd))
    assert message["pid"] == pid and message["ppid"] == forker.pid and message["job"] == {"n": 1}
    assert message["level"] == "high"
    # An OOM kill takes the worker first: its score is raised to the maximum.
    assert message["oom_score_adj"] == 1000
    ended = forker.wait()
    assert ended is not None and ended.pid == pid and ended.code == 0 and ended.signal is None
    assert "exited with code 0" in ended.describe()
    # The helper runs the next job too.
    pid2, fd2 = forker.launch("report", {"n": 2})
    assert [m["job"] for m in read_messages(fd2)] == [{"n": 2}] and pid2 != pid
    assert forker.wait().code == 0  # type: ignore[union-attr]


def test_the_stop_flag_set_after_the_fork_reaches_the_worker(forker: WorkerForker) -> None:
    try:
        pid, fd = forker.launch("report", {"wait_for_stop": True})
        messages = read_messages(fd)
        assert next(messages)["pid"] == pid
        forker.stop_flag.set()
        assert next(messages) == {"stop_seen": True}
        assert forker.wait().code == 0  # type: ignore[union-attr]
    finally:
        forker.stop_flag.clear()


def test_a_killed_worker_is_reported_as_killed(forker: WorkerForker) -> None:
    pid, fd = forker.launch("hang", {})
    messages = read_messages(fd)
    assert next(messages)["pid"] == pid
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    assert list(messages) == []  # the pipe ends with the worker
    ended = forker.wait()
    assert ended is not None and ended.signal == signal.SIGKILL and ended.code is None
    assert ended.describe() == "killed by SIGKILL (out of memory?)"
    assert forker.alive  # the helper is untouched


def test_a_worker_imports_nothing(forker: WorkerForker) -> None:
    pid, fd = forker.launch("report", {"import": True, "before": sorted(sys.modules)})
    messages = list(read_messages(fd))
    assert messages[-1] == {"new_modules": []}
    forker.wait()


def test_the_helper_exits_when_the_daemon_closes_it_and_a_dead_helper_shows() -> None:
    made = WorkerForker()
    made.register("report", report)
    made.start()
    helper = made.pid
    assert helper is not None and made.alive
    made.stop()
    assert made.pid is None and not made.alive
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)  # reaped, gone
    # A helper killed from outside is seen as dead (the daemon's health check then exits).
    other = WorkerForker()
    other.register("report", report)
    other.start()
    assert other.pid is not None
    os.kill(other.pid, signal.SIGKILL)
    os.waitpid(other.pid, 0)
    assert not other.alive
    other.stop()
    with pytest.raises(RuntimeError, match="not running"):
        other.launch("report", {})


def test_entry_points_are_registered_before_the_fork() -> None:
    made = WorkerForker()
    made.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            made.register("late", report)
        with pytest.raises(KeyError):
            made.launch("late", {})
    finally:
        made.stop()


# ------------------------------------------------------------------ the runner's reading of an end


def _runner_with_hanging_worker(tmp_path: Any) -> tuple[Any, Any, WorkerForker, list[Any], threading.Event]:
    from edge_daemon.training.plan import TrainingPlan, plan_candidates
    from edge_daemon.adaptation.runner import UpdateRunner
    from edge_daemon.training.records import JobResult, UpdateJob
    from edge_daemon.training.governor import PlanGovernor
    from tests.conftest import make_config

    forker = WorkerForker()
    forker.register("update", hang)  # stands in for an update that never reaches a boundary
    forker.start()
    ladder = plan_candidates(8, 8)
    governor = PlanGovernor(forker.level, ladder, retry_base_s=300.0)
    results: list[JobResult] = []
    ended = threading.Event()

    def on_result(result: JobResult) -> None:
        results.append(result)
        ended.set()

    runner = UpdateRunner(make_config(tmp_path), governor, forker, on_result)
    assert runner.start(UpdateJob("update", "test", candidates=tuple(ladder)))
    assert isinstance(ladder[0], TrainingPlan)
    return runner, governor, forker, results, ended


def test_a_worker_killed_by_sigkill_counts_as_a_memory_stop(tmp_path: Any) -> None:
    """The kernel's OOM killer sends SIGKILL to the worker (oom_score_adj 1000): the update backs
    off and the next starts with the tightest plan, as after a stop at critical."""
    runner, governor, forker, results, ended = _runner_with_hanging_worker(tmp_path)
    try:
        pid = runner.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        assert ended.wait(60), "the runner must report the killed worker"
        (result,) = results
        assert "killed by SIGKILL" in result.error
        assert result.outcome.stopped is True and result.outcome.worst_level.label == "critical"
        assert governor.retry_after_s > 0
        assert governor.next_start_plan() == governor.ladder[-1]
    finally:
        forker.stop()


def test_a_worker_the_runner_kills_on_shutdown_is_no_memory_stop(tmp_path: Any) -> None:
    runner, governor, forker, results, ended = _runner_with_hanging_worker(tmp_path)
    try:
        runner.stop(timeout=0.5)  # the worker never reaches a boundary: the runner kills it
        assert ended.wait(60)
        (result,) = results
        assert "killed by SIGKILL" in result.error
        assert result.outcome is None
        assert governor.retry_after_s == 0 and governor.next_start_plan() == governor.ladder[0]
    finally:
        forker.stop()


SAVE_IN_A_WORKER = """
import sys
from edge_daemon.training.worker import WorkerForker, read_messages

def save(job, out, level, stop):
    before = set(sys.modules)
    from edge_daemon.training.lora import attach_lora, save_adapter
    from edge_daemon.model import Forecaster, ForecasterConfig
    model = attach_lora(Forecaster(ForecasterConfig(n_channels=3, window=8, d_model=16, n_heads=2, n_layers=2, d_ff=32)), ["head"], r=2, alpha=4)
    save_adapter(model, job["dir"])
    out.put({"new_modules": sorted(set(sys.modules) - before)})
    out.close()

forker = WorkerForker()
forker.register("save", save)
forker.start()
try:
    pid, fd = forker.launch("save", {"dir": sys.argv[1]})
    (message,) = list(read_messages(fd))
    print("NEW", message["new_modules"])
    assert forker.wait().code == 0
finally:
    forker.stop()
"""


def test_a_worker_saving_an_adapter_imports_nothing(tmp_path: Any) -> None:
    """safetensors reaches numpy.ctypeslib lazily on its first save: the helper must have it.

    A fresh interpreter, so that what this test process imported in earlier tests hides nothing."""
    done = subprocess.run([sys.executable, "-c", SAVE_IN_A_WORKER, str(tmp_path / "adapter")], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert "NEW []" in done.stdout.splitlines(), done.stdout
