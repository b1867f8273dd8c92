"""Background jobs on apscheduler: every job coalesces missed runs and never overlaps itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# A job that fails this many runs in a row is broken, not unlucky: the scheduler counts as dead
# and the daemon exits non-zero, so the service manager restarts it.
MAX_FAILURES_IN_A_ROW = 10
# A job neither started nor finished for three of its intervals plus this long is wedged (or
# the scheduler stopped running it): dead too.
STALE_GRACE_S = 600.0


class JobScheduler:
    """apscheduler's BackgroundScheduler with the daemon's job defaults.

    Every job coalesces missed runs into one and never overlaps itself: a
    device that was suspended or overloaded catches up with one run, not a
    queue of them.
    """

    def __init__(self, max_failures: int = MAX_FAILURES_IN_A_ROW, stale_grace_s: float = STALE_GRACE_S) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone="UTC",
        )
        self.max_failures = max_failures
        self.stale_grace_s = stale_grace_s
        self._heartbeats: dict[str, float] = {}  # monotonic time each job last started or ended
        self._intervals: dict[str, float] = {}
        self._failures: dict[str, int] = {}  # runs failed in a row
        self._reported_dead: list[str] = []

    def add(self, name: str, func: Callable[[], Any], interval_s: float, run_now: bool = False) -> None:
        def job() -> None:
            self._heartbeats[name] = time.monotonic()
            try:
                func()
            except Exception:  # one failure is logged and the job runs again next time
                self._failures[name] = self._failures.get(name, 0) + 1
                log.exception("job %s failed (%d in a row)", name, self._failures[name])
            else:
                self._failures[name] = 0
            finally:
                self._heartbeats[name] = time.monotonic()

        self._heartbeats[name] = time.monotonic()

        kwargs: dict[str, Any] = {}
        if run_now:
            from datetime import datetime, timezone

            kwargs["next_run_time"] = datetime.now(timezone.utc)
        self._scheduler.add_job(job, "interval", seconds=interval_s, id=name, name=name, **kwargs)
        self._intervals[name] = interval_s

    def clock_jumped(self, jump_s: float) -> None:
        """The wall clock was stepped: every job runs next one interval from now.

        apscheduler's interval triggers count in wall-clock time from a fixed start: after a
        step back they would wait out the step (two days of no retention, no updates, for a
        clock corrected by two days); after a step forward they would drop one run as missed.
        """
        if not self._scheduler.running:
            return
        for name, interval_s in self._intervals.items():
            self._scheduler.reschedule_job(name, trigger="interval", seconds=interval_s)
        log.info("clock stepped by %+.0f s: background jobs rescheduled from now", jump_s)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        """Running, no job failing `max_failures` runs in a row, none wedged (see `dead_jobs`)."""
        dead = self.dead_jobs()
        if dead and [name.split(" ")[0] for name in dead] != self._reported_dead:
            self._reported_dead = [name.split(" ")[0] for name in dead]
            log.error("background job(s) dead: %s", ", ".join(dead))
        return bool(self._scheduler.running) and not dead

    def dead_jobs(self) -> list[str]:
        """Jobs that failed `max_failures` runs in a row or have not moved for three intervals
        plus `stale_grace_s`, each with why."""
        now = time.monotonic()
        dead = [f"{name} (failed {n} runs in a row)" for name, n in self._failures.items() if n >= self.max_failures]
        for name, beat in list(self._heartbeats.items()):
            if now - beat > 3 * self._intervals[name] + self.stale_grace_s:
                dead.append(f"{name} (stuck for {now - beat:.0f} s)")
        return dead

    def status(self) -> None:
        """No section in `status` (a dead job is logged and ends the daemon; see `alive`)."""
        return None

    def heartbeats(self) -> dict[str, float]:
        return dict(self._heartbeats)
