"""The memory watchdog: a thread sampling the service's usage and keeping the pressure level.

Hysteresis is `PressurePolicy`'s; the level reaches a training worker through
`SharedLevel`. A sample that fails leaves the usage unknown, and unknown usage
is treated as critical: a running update stops at its next micro-batch boundary
rather than train on a level frozen at its last good value. A watchdog that
keeps failing, or whose loop stops moving, is dead like any other part, so the
daemon exits for the service manager to restart it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_daemon.memory.budget import Budget, cgroup_usage_mb, memory_budget
from edge_daemon.memory.pressure import Level, PressurePolicy, SharedLevel
from edge_daemon.memory.usage import TreeMemory, process_tree_rss_mb, system_available_mb
from edge_daemon.control.replies import MemoryStatus

log = logging.getLogger(__name__)

# Samples failed in a row after which the watchdog counts as dead and its loop ends: 20 s at the
# default 0.2 s interval, long enough to ride out a cgroup moved or re-created under us (the budget
# is re-read after every failure), short enough that a sampler that cannot recover restarts the
# daemon well before anyone would look at its log.
MAX_FAILURES_IN_A_ROW = 100
# The loop counts as wedged (dead) when its last sample attempt, failed or not, is older than this
# (or than five intervals, for a long configured interval): a read of /proc or of a cgroup file
# stuck that long leaves the level stale while training runs. Well inside WatchdogSec/2.
STALE_S = 10.0
# While samples keep failing, a reminder with the count at most this often (the first failure is
# logged in full at once).
FAILURE_LOG_INTERVAL_S = 10.0

LevelListener = Callable[[Level, Level], None]


class SampleError(RuntimeError):
    """A sample read no usable usage: the source it depends on is gone or unreadable."""


class MemoryWatchdog:
    """A thread sampling the service's memory and keeping the pressure level.

    Usage is what the kernel counts: where the binding limit is a cgroup's,
    that cgroup's working set (what its OOM killer compares with the limit);
    otherwise the watched process tree's own cost (`TreeMemory`: its
    cgroup's charge when the cgroup holds it alone, else its PSS). Every
    level change is logged and passed to the listeners `(old, new)`, which
    run on the watchdog thread and must be quick.

    A failed sample makes the level critical until a sample succeeds;
    `max_failures` in a row end the thread. `alive` is False once the thread
    has ended or its last sample attempt is older than `stale_s`.
    """

    def __init__(
        self,
        policy: PressurePolicy,
        configured_budget_mb: float | None = None,
        sample_interval_s: float = 0.2,
        pid: int | None = None,
        shared_level: SharedLevel | None = None,
        budget_refresh_s: float = 10.0,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_cgroup: Path | None = None,
        meminfo: Path = Path("/proc/meminfo"),
        max_failures: int = MAX_FAILURES_IN_A_ROW,
        stale_s: float = STALE_S,
    ) -> None:
        if sample_interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self.policy = policy
        self.pid = pid if pid is not None else os.getpid()
        self.sample_interval_s = sample_interval_s
        self.shared_level = shared_level or SharedLevel()
        self._configured_mb = configured_budget_mb
        self._budget_refresh_s = budget_refresh_s
        self._cgroup_root = cgroup_root
        self._proc_cgroup = proc_cgroup or Path(f"/proc/{self.pid}/cgroup")
        self._meminfo = meminfo
        self._listeners: list[LevelListener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._budget = self._read_budget()
        self._budget_read_at = time.monotonic()
        self._level = Level.NORMAL
        self._tree = TreeMemory(self.pid, cgroup_root=cgroup_root, proc_cgroup=self._proc_cgroup)
        self._usage_source = "pss"
        self._rss_mb = 0.0
        self._usage_mb = 0.0
        self._cgroup_mb: float | None = None
        self._available_mb = 0.0
        self._peak_rss_mb = 0.0
        self._peak_usage_mb = 0.0
        self.max_failures = max_failures
        # A loop that waits one interval between samples must not count as wedged for that wait.
        self.stale_s = max(stale_s, 5 * sample_interval_s)
        self.heartbeat = 0.0  # monotonic time of the loop's last sample attempt, failed or not
        self.samples = 0
        self.failures = 0  # samples failed in a row
        self._failure_logged_at = float("-inf")

    @classmethod
    def from_config(cls, memory: Any, **kwargs: Any) -> MemoryWatchdog:
        """Built from the `[memory]` config section; kwargs as in `__init__`."""
        return cls(
            PressurePolicy.from_config(memory),
            configured_budget_mb=memory.budget_mb,
            sample_interval_s=memory.sample_interval_s,
            **kwargs,
        )

    # -- reading -------------------------------------------------------------

    @property
    def level(self) -> Level:
        return self._level

    def read_level(self) -> Level:
        """The current level; a `level_reader` for an in-process PlanGovernor."""
        return self._level

    @property
    def budget(self) -> Budget:
        return self._budget

    @property
    def budget_mb(self) -> float:
        return self._budget.mb

    @property
    def rss_mb(self) -> float:
        """RSS of the watched process tree at the last sample."""
        return self._rss_mb

    @property
    def usage_mb(self) -> float:
        """What the level is computed from: the limiting cgroup's working set, else the tree's cost."""
        return self._usage_mb

    @property
    def usage_source(self) -> str:
        """How `usage_mb` was counted: "cgroup limit", "cgroup" (the tree's own) or "pss"."""
        return self._usage_source

    @property
    def peak_rss_mb(self) -> float:
        """Largest tree RSS seen since start or `reset_peak()`."""
        return self._peak_rss_mb

    @property
    def available_mb(self) -> float:
        return self._available_mb

    @property
    def fraction(self) -> float:
        return self._usage_mb / self._budget.mb

    @property
    def peak_usage_mb(self) -> float:
        """Largest `usage_mb` seen since start or `reset_peak()`."""
        return self._peak_usage_mb

    def reset_peak(self) -> None:
        self._peak_rss_mb = self._rss_mb
        self._peak_usage_mb = self._usage_mb

    def snapshot(self) -> MemoryStatus:
        """The `memory` part of the status reply."""
        return {
            "rss_mb": round(self._rss_mb, 1),
            "budget_mb": round(self._budget.mb, 1),
            "level": self._level.label,
            "usage_mb": round(self._usage_mb, 1),
            "usage_source": self._usage_source,
            "peak_rss_mb": round(self._peak_rss_mb, 1),
            "available_mb": round(self._available_mb, 1),
            "cgroup_mb": None if self._cgroup_mb is None else round(self._cgroup_mb, 1),
            "budget_source": self._budget.source,
        }

    def status(self) -> MemoryStatus:
        """Its section of `status` (the part protocol's name for `snapshot`)."""
        return self.snapshot()

    def add_listener(self, listener: LevelListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: LevelListener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    # -- sampling ------------------------------------------------------------

    def set_configured_budget(self, configured_mb: float | None) -> Budget:
        """Change the configured budget (config reload); the budget is re-read at once."""
        self._configured_mb = configured_mb
        self._budget_read_at = float("-inf")  # the next sample re-reads
        return self._read_budget()

    def _read_budget(self) -> Budget:
        return memory_budget(self._configured_mb, self._cgroup_root, self._proc_cgroup, self._meminfo)

    def sample(self) -> Level:
        """Take one sample now, update the level and notify on change; returns the level."""
        now = time.monotonic()
        if now - self._budget_read_at >= self._budget_refresh_s:
            # Limits change at run time (systemctl set-property MemoryMax=...).
            budget = self._read_budget()
            if budget != self._budget:
                log.info("memory budget %.0f MB (%s), was %.0f MB", budget.mb, budget.source, self._budget.mb)
                self._budget = budget
            self._budget_read_at = now
        # Against a cgroup's limit, that cgroup's charge (it may hold more than this tree); against
        # the config or the machine, what this tree costs (no PSS read where it is not used).
        if self._budget.cgroup_dir is not None:
            cgroup_mb = cgroup_usage_mb(self._budget.cgroup_dir)
            if cgroup_mb is None:
                # The tree's own cost is no stand-in: the cgroup may hold more than this tree.
                raise SampleError(f"the usage of {self._budget.cgroup_dir}, whose limit is the budget, is unreadable")
            rss = process_tree_rss_mb(self.pid)
            usage_mb, usage_source = cgroup_mb, "cgroup limit"
        else:
            cgroup_mb = None
            usage_mb, usage_source = self._tree.usage_mb(), self._tree.source
            rss = self._tree.rss_mb
        if rss <= 0:
            # A running process has resident pages; none read means its /proc entry is gone or
            # unreadable, and the tree's usage (counted as 0) is unknown, not small.
            raise SampleError(f"no memory readable for process {self.pid} (/proc/{self.pid} gone or unreadable)")
        self._usage_mb, self._usage_source = usage_mb, usage_source
        self._rss_mb = rss
        self._cgroup_mb = cgroup_mb
        self._available_mb = system_available_mb()
        self._peak_rss_mb = max(self._peak_rss_mb, rss)
        self._peak_usage_mb = max(self._peak_usage_mb, self._usage_mb)
        old = self._level
        new = self.policy.next_level(old, self.fraction, self._available_mb)
        self.samples += 1
        if new != old:
            log.log(
                logging.WARNING if new >= Level.HIGH and new > old else logging.INFO,
                "memory level %s -> %s (usage %.0f MB = %.0f%% of %.0f MB budget, tree rss %.0f MB, available %.0f MB)",
                old.label,
                new.label,
                self._usage_mb,
                100 * self.fraction,
                self._budget.mb,
                self._rss_mb,
                self._available_mb,
            )
            self._set_level(old, new)
        return new

    def _sample_or_count_failure(self) -> None:
        """One sample on the thread: a failure is counted, logged (rate-limited) and makes the level critical."""
        try:
            self.sample()
        except Exception as exc:
            self.failures += 1
            # The limit may have moved with whatever broke (a cgroup removed or re-created): the
            # next sample re-reads the budget rather than wait for its refresh.
            self._budget_read_at = float("-inf")
            now = time.monotonic()
            if self.failures == 1:
                log.warning(
                    "memory sample failed: %s; usage unknown, so the memory level is critical until a sample succeeds",
                    exc,
                    exc_info=not isinstance(exc, SampleError),
                )
                self._failure_logged_at = now
            elif now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_S:
                log.warning("memory sampling still failing (%d in a row): %s; memory level critical", self.failures, exc)
                self._failure_logged_at = now
            if self._level != Level.CRITICAL:
                self._set_level(self._level, Level.CRITICAL)
        else:
            if self.failures:
                log.info("memory sampling recovered after %d failed sample(s); level %s", self.failures, self._level.label)
            self.failures = 0
        self.heartbeat = time.monotonic()

    def _set_level(self, old: Level, new: Level) -> None:
        self._level = new
        self.shared_level.set(new)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(old, new)
            except Exception:
                log.exception("memory level listener %r failed", listener)

    # -- thread --------------------------------------------------------------

    def start(self) -> MemoryWatchdog:
        if self._thread is not None:
            raise RuntimeError("watchdog already started")
        self.sample()
        self.heartbeat = time.monotonic()
        log.info(
            "memory watchdog started: budget %.0f MB (%s), tree rss %.0f MB, sampling every %.2f s",
            self._budget.mb,
            self._budget.source,
            self._rss_mb,
            self.sample_interval_s,
        )
        self._thread = threading.Thread(target=self._run, name="memory-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # A few failures in a row are survived (at critical); a sampler that keeps failing ends
        # here, the part counts as dead and the daemon is restarted. The level stays critical
        # meanwhile, so no update trains on a frozen level.
        while self.failures < self.max_failures and not self._stop.wait(self.sample_interval_s):
            self._sample_or_count_failure()
        if self.failures >= self.max_failures:
            log.error("memory sampling failed %d times in a row; the memory watchdog stops", self.failures)
        else:
            log.info("memory watchdog stopped")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """The thread runs (it ends after `max_failures` failed samples in a row) and its last
        sample attempt is younger than `stale_s`."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and time.monotonic() - self.heartbeat < self.stale_s
        )

    def __enter__(self) -> MemoryWatchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
