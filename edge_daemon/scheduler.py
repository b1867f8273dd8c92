"""Background jobs (apscheduler) and the decision of when to adapt.

`UpdateTrigger` decides whether an update may start: only when the device is
idle and there is a reason (drift, enough new data, or a request), never two
at once and never closer together than `train.min_interval_s`. The decision
is a pure function of what it is told, with an injectable clock, so it can be
tested without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from edge_daemon.config import TrainConfig

log = logging.getLogger(__name__)

# The end of the reason of an update started only because enough new data came in.
NEW_DATA_REASON = " new windows"


def resets_drift_baseline(reason: str | None) -> bool:
    """Whether an adapter from an update started for `reason` restarts the drift references.

    After drift, a request or a rollback the served model meets data it was
    not judged on, so the references are learnt again. A routine update on
    new data is not: the gate found it no worse on recent data, so the
    current references stay the yardstick. Were they restarted, updates every
    few hours would keep a day-long window learning for ever.
    """
    return not (reason or "").endswith(NEW_DATA_REASON)


Clock = Callable[[], float]


class IdleDetector:
    """Device CPU use averaged over a recent window; idle when below a threshold.

    `sample()` is called periodically (a scheduler job); each call records the
    CPU percentage since the previous call (psutil's non-blocking form).
    """

    def __init__(
        self,
        cpu_threshold: float,
        window_s: float,
        clock: Clock = time.monotonic,
        cpu_reader: Callable[[], float] | None = None,
    ) -> None:
        if not 0 < cpu_threshold <= 100:
            raise ValueError(f"cpu_threshold must be in (0, 100], got {cpu_threshold}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.cpu_threshold = cpu_threshold
        self.window_s = window_s
        self._clock = clock
        self._cpu_reader = cpu_reader or (lambda: psutil.cpu_percent(interval=None))
        self._samples: deque[tuple[float, float]] = deque()
        self._first_sample_at: float | None = None
        self._lock = threading.Lock()

    def sample(self) -> float:
        now = self._clock()
        cpu = float(self._cpu_reader())
        with self._lock:
            if self._first_sample_at is None:
                self._first_sample_at = now
            self._samples.append((now, cpu))
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()
        return cpu

    @property
    def cpu_percent(self) -> float | None:
        with self._lock:
            if not self._samples:
                return None
            return sum(c for _, c in self._samples) / len(self._samples)

    def idle(self) -> bool:
        """True once a whole window has been observed and its mean is below the threshold.

        A threshold of 100 counts every window as idle: CPU use never exceeds 100%, and a device
        that is meant to adapt whatever else it runs must not wait for a share it cannot see.
        """
        with self._lock:
            if self._first_sample_at is None or self._clock() - self._first_sample_at < self.window_s:
                return False
        mean = self.cpu_percent
        return mean is not None and (mean < self.cpu_threshold or self.cpu_threshold >= 100)


@dataclass(frozen=True)
class TriggerInputs:
    """What the trigger needs to know about the daemon right now."""

    idle: bool
    memory_level: str  # "normal" | "elevated" | "high" | "critical"
    backlog: int  # readings received but not yet committed
    drift_detected: bool
    new_windows: int  # scoring windows completed since the last update
    has_base: bool  # a base model exists (else nothing to adapt)
    # MB left under the critical threshold once the training worker's expected increment is
    # added; negative: the update would be stopped at critical, so it does not start.
    headroom_mb: float = float("inf")


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str  # why it starts, or why not


class UpdateTrigger:
    """Decides when an update starts; remembers requests, spacing and the one running update."""

    def __init__(self, cfg: TrainConfig, max_backlog: int = 1000, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self.max_backlog = max_backlog
        self._clock = clock
        self._requested = False
        self._running = False
        self._last_start: float | None = None
        self._retry_not_before: float | None = None
        self._lock = threading.Lock()

    def request(self) -> bool:
        """An operator asked for an update (`train`): it still waits for idle and memory.

        False, and nothing remembered, when `train.start_on` leaves requests out.
        """
        if "request" not in self.cfg.start_on:
            return False
        with self._lock:
            self._requested = True
        return True

    @property
    def requested(self) -> bool:
        return self._requested

    @property
    def running(self) -> bool:
        return self._running

    def decide(self, inputs: TriggerInputs) -> Decision:
        with self._lock:
            now = self._clock()
            if self._running:
                return Decision(False, "an update is running")
            if not inputs.has_base:
                return Decision(False, "no base model yet")
            if self._retry_not_before is not None and now < self._retry_not_before:
                return Decision(False, f"backing off for {self._retry_not_before - now:.0f}s after a stopped update")
            if self._last_start is not None and not self._requested and now - self._last_start < self.cfg.min_interval_s:
                return Decision(False, f"last update {now - self._last_start:.0f}s ago (min {self.cfg.min_interval_s:.0f}s)")
            # Above normal an update still starts, with a tighter plan, where the worker's expected
            # increment fits under the critical line (`headroom_mb`); at critical nothing starts.
            if inputs.memory_level == "critical":
                return Decision(False, "memory level critical")
            if inputs.headroom_mb < 0:
                return Decision(False, f"not enough memory for the training worker ({-inputs.headroom_mb:.0f} MB short)")
            if inputs.backlog > self.max_backlog:
                return Decision(False, f"ingestion backlog of {inputs.backlog} readings")
            if not inputs.idle:
                return Decision(False, "device busy")
            allowed = self.cfg.start_on
            if self._requested and "request" in allowed:
                reason = "requested"
            elif inputs.drift_detected and "drift" in allowed:
                reason = "drift detected"
            elif inputs.new_windows >= self.cfg.min_new_windows and "new_data" in allowed:
                reason = f"{inputs.new_windows}{NEW_DATA_REASON}"
            else:
                return Decision(False, "no reason to adapt")
            return Decision(True, reason)

    def started(self) -> None:
        with self._lock:
            self._running = True
            self._requested = False
            self._last_start = self._clock()

    def finished(self, stopped_for_memory: bool = False, backoff_s: float = 0.0) -> None:
        with self._lock:
            self._running = False
            self._retry_not_before = self._clock() + backoff_s if stopped_for_memory else None


class JobScheduler:
    """apscheduler's BackgroundScheduler with the daemon's job defaults.

    Every job coalesces missed runs into one and never overlaps itself: a
    device that was suspended or overloaded catches up with one run, not a
    queue of them.
    """

    def __init__(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone="UTC",
        )
        self._heartbeats: dict[str, float] = {}

    def add(self, name: str, func: Callable[[], Any], interval_s: float, run_now: bool = False) -> None:
        def job() -> None:
            try:
                func()
            except Exception:  # a failing job must not kill the scheduler; it runs again next time
                log.exception("job %s failed", name)
            finally:
                self._heartbeats[name] = time.monotonic()

        kwargs: dict[str, Any] = {}
        if run_now:
            from datetime import datetime, timezone

            kwargs["next_run_time"] = datetime.now(timezone.utc)
        self._scheduler.add_job(job, "interval", seconds=interval_s, id=name, name=name, **kwargs)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return bool(self._scheduler.running)

    def heartbeats(self) -> dict[str, float]:
        return dict(self._heartbeats)
