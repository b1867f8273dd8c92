"""When an update may start: the device idle, a reason (drift, enough new data, a request).

`UpdateTrigger` starts none while one runs and none closer together than
`train.min_interval_s`; its decision is a pure function of what it is told,
with an injectable clock, so it can be tested without waiting.
`IdleDetector` says whether the device is idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from edge_daemon.config import TrainConfig
from edge_daemon.memory.pressure import Level
from edge_daemon.training.records import UpdateCause

log = logging.getLogger(__name__)

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
    memory_level: Level
    backlog: int  # readings received but not yet committed
    drift_detected: bool
    new_windows: int  # scoring windows completed since the last update
    has_base: bool  # a base model exists (else nothing to adapt)
    # MB left under the critical threshold once the training worker's expected increment is
    # added; negative: the update would be stopped at critical, so it does not start.
    headroom_mb: float = float("inf")
    # Less free disk than `[store] disk_reserve_mb` (or ingestion waiting for space): an update
    # would write an adapter, traces and the store's reads where readings need the room.
    disk_short: bool = False


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str  # why it starts, or why not, for people
    cause: UpdateCause | None = None  # what starts it (set when `start`)


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
            if inputs.memory_level >= Level.CRITICAL:
                return Decision(False, "memory level critical")
            if inputs.disk_short:
                return Decision(False, "disk space short")
            if inputs.headroom_mb < 0:
                return Decision(False, f"not enough memory for the training worker ({-inputs.headroom_mb:.0f} MB short)")
            if inputs.backlog > self.max_backlog:
                return Decision(False, f"ingestion backlog of {inputs.backlog} readings")
            if not inputs.idle:
                return Decision(False, "device busy")
            allowed = self.cfg.start_on
            if self._requested and "request" in allowed:
                return Decision(True, "requested", "request")
            if inputs.drift_detected and "drift" in allowed:
                return Decision(True, "drift detected", "drift")
            if inputs.new_windows >= self.cfg.min_new_windows and "new_data" in allowed:
                return Decision(True, f"{inputs.new_windows} new windows", "new_data")
            return Decision(False, "no reason to adapt")

    def started(self) -> None:
        with self._lock:
            self._running = True
            self._requested = False
            self._last_start = self._clock()

    def finished(self, stopped_for_memory: bool = False, backoff_s: float = 0.0) -> None:
        with self._lock:
            self._running = False
            self._retry_not_before = self._clock() + backoff_s if stopped_for_memory else None
