"""An update's trace: memory, phases, plan changes and step losses sampled over one update, and
which heavy libraries the process has loaded.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_daemon.artifacts.traces import TraceJob, TraceLevel, TracePhase, TracePlan, UpdateTraceJson
from edge_daemon.training.plan import TrainingPlan

# Samples are thinned (every other one dropped, interval doubled) past this many, so a long
# update's trace stays a few tens of kB.
TRACE_MAX_POINTS = 600
TRACE_INTERVAL_S = 0.1  # first sampling period; fine enough to see a plan change take effect
# Libraries of tens of MB each that neither the daemon nor (forked from it) a worker needs.
HEAVY_MODULES = ("peft", "transformers", "accelerate", "bitsandbytes", "torch._dynamo", "sympy")


def heavy_modules_loaded() -> list[str]:
    """Which of HEAVY_MODULES this process has loaded: anything here is a regression the memory figures would show."""
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


class UpdateTrace:
    """Memory over time, phases, plan changes and step losses of one update.

    Times are seconds since `start()`. Each sample holds this process's RSS
    and its private memory (pages no other process maps: what a forked worker
    adds to the service) and, with `service_pid` (the daemon, when this runs
    in its training worker), the whole service's usage as the watchdog counts
    it (the cgroup's charge, else the tree's PSS): what the budget is
    measured against. Reading private memory costs ~1 ms, ~1% of a core at
    the first sampling period. Samples come on the process's one sampling
    thread (`memory.sampling`), which also serves the training loop's peak RSS.
    """

    def __init__(self, interval_s: float = 0.1, service_pid: int | None = None, level_reader: Callable[[], Any] | None = None) -> None:
        from edge_daemon.memory.sampling import Subscription, process_sampler
        from edge_daemon.memory.usage import TreeMemory

        self.interval_s = interval_s
        self.service_pid = service_pid
        self._service = TreeMemory(service_pid) if service_pid is not None else None
        self.level_reader = level_reader
        self._sampler = process_sampler()
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()
        self.started_unix = time.time()
        self._t0 = time.monotonic()
        self.samples: dict[str, list[float | None]] = {"t": [], "rss_mb": [], "private_mb": [], "service_mb": []}
        self.phases: list[TracePhase] = []
        self.plans: list[TracePlan] = []
        self.levels: list[TraceLevel] = []
        self.steps: dict[str, list[float]] = {"t": [], "step": [], "loss": []}

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def _sample(self, rss_bytes: int | None = None) -> None:
        """One sample; `rss_bytes` is the sampling thread's reading, read here when called at an event."""
        from edge_daemon.memory.usage import private_mb

        rss = (self._sampler.rss_bytes() if rss_bytes is None else rss_bytes) / 2**20
        private = private_mb()
        service = None
        if self._service is not None:
            try:
                service = round(self._service.usage_mb(), 1)
            except Exception:  # the daemon may be gone; the worker's own figures are still worth keeping
                service = None
        level = None
        if self.level_reader is not None:
            try:
                level = self.level_reader().label
            except Exception:
                level = None
        with self._lock:
            # Timed under the lock: a sample from the sampler thread and one at a phase change,
            # taken at once, then land in time order whichever measured first.
            t = self.now()
            self.samples["t"].append(t)
            self.samples["rss_mb"].append(round(rss, 1))
            self.samples["private_mb"].append(None if private is None else round(private, 1))
            self.samples["service_mb"].append(service)
            if level is not None and (not self.levels or self.levels[-1]["level"] != level):
                self.levels.append({"t": t, "level": level})
            if len(self.samples["t"]) > TRACE_MAX_POINTS:
                for key in self.samples:
                    self.samples[key] = self.samples[key][::2]
                self.interval_s *= 2
                if self._subscription is not None:
                    self._subscription.interval_s = self.interval_s

    def start(self) -> UpdateTrace:
        self.started_unix = time.time()
        self._t0 = time.monotonic()
        self._sample()
        self._subscription = self._sampler.add(self._sample, self.interval_s)
        return self

    def stop(self) -> None:
        if self._subscription is not None:
            self._sampler.remove(self._subscription)
            self._subscription = None
        self._sample()

    def phase(self, name: str) -> None:
        """Mark the start of a phase, with a memory sample at it (as at every plan change), so a
        trace has its memory at each event whatever the sampling period caught in between."""
        with self._lock:
            self.phases.append({"t": self.now(), "phase": name})
        self._sample()

    def plan(self, plan: TrainingPlan, level: str | None = None) -> None:
        with self._lock:
            self.plans.append({"t": self.now(), "plan": plan.to_dict(), "level": level})
        self._sample()

    def step(self, step: int, loss: float) -> None:
        with self._lock:
            if len(self.steps["t"]) >= 4 * TRACE_MAX_POINTS:
                for key in self.steps:
                    self.steps[key] = self.steps[key][::2]
            self.steps["t"].append(self.now())
            self.steps["step"].append(step)
            self.steps["loss"].append(float(loss))

    def to_dict(self, job: TraceJob | None = None) -> UpdateTraceJson:
        """The trace as saved, with what `job` adds (its keys after the trace's)."""
        with self._lock:
            def peak(key: str) -> float | None:
                values = [v for v in self.samples[key] if v is not None]
                return max(values) if values else None

            return {
                "started_unix": self.started_unix,
                "duration_s": self.now(),
                "interval_s": self.interval_s,
                "peak_sampled_rss_mb": peak("rss_mb"),
                "peak_sampled_private_mb": peak("private_mb"),
                "peak_sampled_service_mb": peak("service_mb"),
                "samples": {k: list(v) for k, v in self.samples.items()},
                "phases": list(self.phases),
                "plans": list(self.plans),
                "levels": list(self.levels),
                "steps": {k: list(v) for k, v in self.steps.items()},
                **(job or {}),
            }


__all__ = ["HEAVY_MODULES", "TRACE_INTERVAL_S", "TRACE_MAX_POINTS", "UpdateTrace", "heavy_modules_loaded"]
