"""How many updates ended, by cause and outcome, and how long they took: counted as each result
arrives, for the metrics (`training.last` in `status` keeps only the latest).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Literal

from edge_daemon.training.records import JobResult

TallyCause = Literal["request", "drift", "new_data", "bootstrap"]
TallyOutcome = Literal["accepted", "rejected", "stopped", "failed", "shutdown"]
CAUSES: tuple[TallyCause, ...] = ("request", "drift", "new_data", "bootstrap")
OUTCOMES: tuple[TallyOutcome, ...] = ("accepted", "rejected", "stopped", "failed", "shutdown")
# Upper bounds (seconds) of the duration buckets: an update takes from tens of seconds (the default
# model on a Pi-class core) to most of an hour (a large one throttled by memory pressure).
DURATION_BUCKETS_S: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


def cause_of(result: JobResult) -> TallyCause:
    """What started the job: the trigger's cause, or `bootstrap` for a base model trained from the store."""
    if result.kind == "pretrain":
        return "bootstrap"
    cause = result.job.cause if result.job is not None else None
    return cause if cause is not None else "request"


def outcome_of(result: JobResult, shutting_down: bool) -> TallyOutcome:
    """How it ended: the gate's verdict, stopped at critical memory, failed (the worker died or
    raised), or stopped for the daemon's shutdown."""
    if result.aborted and shutting_down:
        return "shutdown"
    if result.stopped_for_memory or result.aborted:
        return "stopped"
    if result.error:
        return "failed"
    return "accepted" if result.accepted else "rejected"


@dataclass
class DurationCounts:
    """One (cause, outcome)'s durations: cumulative-ready bucket counts (the last is +Inf), sum, count."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))
    sum_s: float = 0.0
    count: int = 0


class UpdateTally:
    """Counts of ended jobs by (cause, outcome) and their durations; thread-safe (results arrive
    on the runner's monitor thread, readers are scrapes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[TallyCause, TallyOutcome], int] = {}
        self._durations: dict[tuple[TallyCause, TallyOutcome], DurationCounts] = {}

    def record(self, result: JobResult, shutting_down: bool) -> None:
        key = (cause_of(result), outcome_of(result, shutting_down))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if result.duration_s is not None:
                durations = self._durations.setdefault(key, DurationCounts())
                durations.buckets[bisect.bisect_left(DURATION_BUCKETS_S, result.duration_s)] += 1
                durations.sum_s += result.duration_s
                durations.count += 1

    def counts(self) -> dict[tuple[TallyCause, TallyOutcome], int]:
        """Every (cause, outcome), zero where none ended so."""
        with self._lock:
            return {(cause, outcome): self._counts.get((cause, outcome), 0) for cause in CAUSES for outcome in OUTCOMES}

    def durations(self) -> dict[tuple[TallyCause, TallyOutcome], DurationCounts]:
        """The (cause, outcome)s that ended with a duration so far."""
        with self._lock:
            return {key: DurationCounts(list(d.buckets), d.sum_s, d.count) for key, d in self._durations.items()}
