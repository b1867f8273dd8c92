"""Background jobs on apscheduler: every job coalesces missed runs and never overlaps itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


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
        self._intervals: dict[str, float] = {}

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
        return bool(self._scheduler.running)

    def heartbeats(self) -> dict[str, float]:
        return dict(self._heartbeats)
