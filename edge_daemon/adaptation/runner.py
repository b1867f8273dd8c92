"""The daemon's side of a training job: start one, relay its progress, report how it ended.

A job runs in a worker forked from the training helper (`worker.py`), running
`training.job.run_worker`; it sends `Progress` messages and one `JobResult`. A
worker that dies without a result (the OOM killer, a crash) is reported as a
failed result built from its exit status. An update that starts forward-only
costs a scoring pass and runs on a thread of the daemon instead
(`training.job.run_in_service`), writing the same messages into a pipe.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from edge_daemon.config import Config
from edge_daemon.training.job import run_in_service
from edge_daemon.training.records import JobResult, Progress, UpdateJob, WorkerOrder
from edge_daemon.training.governor import PlanGovernor, UpdateOutcome
from edge_daemon.memory.pressure import Level
from edge_daemon.training.worker import MessageWriter, WorkerForker, read_messages

log = logging.getLogger(__name__)

# The worker entry point's name in the helper (registered by the daemon before the helper forks).
WORKER_TARGET = "update"


class UpdateRunner:
    """Starts update/pretrain workers one at a time (forked by `forker`) and relays what they report.

    `on_result(result)` runs in the runner's monitor thread when a worker ends.
    """

    def __init__(self, config: Config, governor: PlanGovernor, forker: WorkerForker, on_result: Callable[[JobResult], None]) -> None:
        self.config = config
        self.governor = governor
        self.forker = forker
        self.on_result = on_result
        self._pid: int | None = None
        self._in_service: threading.Thread | None = None  # the thread running a forward-only update
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._killing = False  # stop() sent SIGKILL: not an OOM kill
        self.job: UpdateJob | None = None
        self.progress: Progress = Progress("idle")
        self.last: JobResult | None = None

    @property
    def running(self) -> bool:
        return self._pid is not None or self._in_service is not None

    @property
    def child_pid(self) -> int | None:
        return self._pid

    def start(self, job: UpdateJob) -> bool:
        """Start `job` in a worker (an update that starts forward-only: on a thread of the
        daemon); False if one is running."""
        with self._lock:
            if self.running:
                return False
            self.forker.stop_flag.clear()
            self._killing = False
            governor = copy.copy(self.governor)  # the job's own, as a worker's is
            if job.kind == "update" and job.candidates and job.candidates[0].forward_only:
                job = replace(job, in_service=True).started()
                read_fd, write_fd = os.pipe()
                self._in_service = threading.Thread(
                    target=run_in_service, args=(self.config, job, governor, self.forker.stop_flag, MessageWriter(write_fd)),
                    name="update-in-service", daemon=True,
                )  # fmt: skip
                self._in_service.start()
                messages = read_fd
                log.info("%s started forward-only in the service (%s)", job.kind, job.reason)
            else:
                # The governor travels without its level reader and stop event (shared memory the
                # worker inherits from the helper instead).
                governor.level_reader, governor.stop_event = None, None  # type: ignore[assignment]
                job = job.started()
                order = WorkerOrder(job, self.config.model_dump(mode="json"), governor, os.getpid())
                self._pid, messages = self.forker.launch(WORKER_TARGET, order)
                log.info("%s started in worker pid %d (%s)", job.kind, self._pid, job.reason)
            self.job = job
            self.progress = Progress("starting")
            self._thread = threading.Thread(target=self._monitor, args=(messages, job), name="update-monitor", daemon=True)
            self._thread.start()
            return True

    def _monitor(self, messages: int, job: UpdateJob) -> None:
        result: JobResult | None = None
        for message in read_messages(messages):
            if isinstance(message, JobResult):
                result = message
            elif isinstance(message, Progress):
                self.progress = message
        if job.in_service:
            killed = False
            if result is None:  # run_in_service writes a result whatever happens, unless the process ends
                result = JobResult(job.kind, accepted=False, error="the update in the service ended with no result")
        else:
            ended = self.forker.wait()
            killed = ended is not None and ended.signal == signal.SIGKILL and not self._killing
            if result is None:
                how = ended.describe() if ended is not None else "ended (the training helper is gone)"
                result = JobResult(job.kind, accepted=False, error=f"training worker {how} with no result")
        result.job = job
        result.finished_unix = time.time()
        result.duration_s = result.finished_unix - (job.started_unix or result.finished_unix)
        if result.outcome is not None:
            self.governor.end_update(result.outcome)
        elif job.kind == "update" and job.candidates:
            # No outcome (a crash): a memory stop if memory was critical or the kernel's OOM killer
            # took the worker (SIGKILL, not sent by stop()): back off and retry with the tightest plan.
            plan = job.candidates[0]
            level = self.governor.level_reader()
            outcome = UpdateOutcome(plan, plan, max(level, Level.CRITICAL) if killed else level, killed or level >= Level.CRITICAL)
            self.governor.end_update(outcome)
            if killed:
                result.outcome = outcome
        with self._lock:
            self._pid = None
            self._in_service = None
            self.last = result
            self.job = None
            self.progress = Progress("idle")
        try:
            self.on_result(result)
        except Exception:
            log.exception("handling the update result failed")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask a running job to stop at its next micro-batch boundary; kill its worker after
        `timeout` (a thread in the service cannot be killed: it is left to the process's exit)."""
        thread = self._thread
        if not self.running or thread is None:
            return
        self.forker.stop_flag.set()
        thread.join(timeout)
        if thread.is_alive() and self._in_service is not None:
            log.warning("the update in the service did not stop within %.0f s", timeout)
            return
        pid = self._pid
        if thread.is_alive() and pid is not None:
            log.warning("training worker did not stop within %.0f s; killing it", timeout)
            self._killing = True
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            thread.join(10.0)
