"""Memory budget, pressure level and how a running update tightens under it.

Owns: the budget (config, cgroup v1/v2 limit, machine), usage of the service's
process tree, the pressure level with hysteresis (a sampling thread), the
level shared with a training child, and the plan ladder the trainer walks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any

import psutil

from edge_daemon.plan import TrainingPlan

log = logging.getLogger(__name__)

MB = 1024 * 1024
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX * page size (~2**63); any
# value this large cannot be a real limit on a device.
_UNLIMITED_BYTES = 1 << 60
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Level(IntEnum):
    """Memory pressure, ordered so that comparisons mean 'worse than'."""

    NORMAL = 0
    ELEVATED = 1
    HIGH = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        """The name used in logs and the status reply."""
        return self.name.lower()


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """The memory the service may use and where that number came from.

    `cgroup_dir` is the cgroup whose limit is binding (None when the limit is
    the config or the machine): its usage counter is what the kernel's OOM
    killer compares against that limit.
    """

    mb: float
    source: str
    cgroup_dir: Path | None = None


def _read_int(path: Path) -> int | None:
    """An integer control file; None when missing, unreadable or 'max'."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _limit_bytes(path: Path) -> int | None:
    value = _read_int(path)
    if value is None or value <= 0 or value >= _UNLIMITED_BYTES:
        return None
    return value


def _parse_proc_cgroup(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process from /proc/<pid>/cgroup."""
    v2: str | None = None
    v1_memory: str | None = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, controllers, path = parts
        if hier_id == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1_memory = path
    return v2, v1_memory


def _cgroup_dir(mount: Path, cgroup_path: str) -> Path | None:
    """The directory of `cgroup_path` under a hierarchy mounted at `mount`.

    Inside a container without a cgroup namespace, /proc/self/cgroup shows the
    host path (/docker/<id>) while the container's mount is rooted at that
    very cgroup, so leading components are dropped until a directory exists.
    """
    if not mount.is_dir():
        return None
    parts = [p for p in cgroup_path.split("/") if p]
    for start in range(len(parts) + 1):
        candidate = mount.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return None


def _ancestors(directory: Path, mount: Path) -> list[Path]:
    """`directory` and its parents up to and including the hierarchy root.

    A limit on any ancestor also bounds this cgroup (hierarchical
    accounting), e.g. systemd's slice limits.
    """
    chain = [directory]
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        chain.append(directory)
    return chain


@dataclass(frozen=True)
class _CgroupLayout:
    """Where this process's memory cgroup lives and how to read it."""

    version: int
    mount: Path
    directory: Path

    @property
    def limit_files(self) -> tuple[str, ...]:
        # memory.high is where the kernel starts throttling and reclaiming
        # hard, so for a service that must stay responsive it is a limit too.
        return ("memory.max", "memory.high") if self.version == 2 else ("memory.limit_in_bytes",)


def _cgroup_layouts(cgroup_root: Path, proc_cgroup: Path) -> list[_CgroupLayout]:
    v2_path, v1_path = _parse_proc_cgroup(proc_cgroup)
    layouts: list[_CgroupLayout] = []
    # Unified (pure v2) when the root itself is a cgroup2 hierarchy. In hybrid
    # mode the v2 tree at <root>/unified never carries the memory controller.
    if v2_path is not None and (cgroup_root / "cgroup.controllers").exists():
        directory = _cgroup_dir(cgroup_root, v2_path)
        if directory is not None:
            layouts.append(_CgroupLayout(2, cgroup_root, directory))
    if v1_path is not None:
        mount = cgroup_root / "memory"
        directory = _cgroup_dir(mount, v1_path)
        if directory is not None:
            layouts.append(_CgroupLayout(1, mount, directory))
    return layouts


def _machine_total_mb(meminfo: Path) -> float:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return psutil.virtual_memory().total / MB


def memory_budget(
    configured_mb: float | None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> Budget:
    """The smallest of the configured budget, the cgroup limit and the machine's RAM."""
    best = Budget(_machine_total_mb(meminfo), "machine MemTotal")
    for layout in _cgroup_layouts(cgroup_root, proc_cgroup):
        for directory in _ancestors(layout.directory, layout.mount):
            for name in layout.limit_files:
                limit = _limit_bytes(directory / name)
                if limit is not None and limit / MB < best.mb:
                    best = Budget(limit / MB, f"cgroup v{layout.version} {name} ({directory})", directory)
    if configured_mb is not None and configured_mb < best.mb:
        best = Budget(float(configured_mb), "config [memory] budget_mb")
    return best


def cgroup_usage_mb(
    directory: Path | None = None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> float | None:
    """Working set of a memory cgroup in MB, or None where there is none.

    `directory` defaults to this process's own memory cgroup. The raw counter
    (v2 memory.current, v1 memory.usage_in_bytes) includes page cache the
    kernel can drop; inactive file pages are subtracted as the kubelet does,
    which is what actually pushes a cgroup towards its OOM kill.
    """
    if directory is None:
        layouts = _cgroup_layouts(cgroup_root, proc_cgroup)
        if not layouts:
            return None
        directory = layouts[0].directory
    if (directory / "memory.current").exists():
        usage_file, inactive_key = "memory.current", "inactive_file"
    else:
        usage_file, inactive_key = "memory.usage_in_bytes", "total_inactive_file"
    usage = _read_int(directory / usage_file)
    if usage is None:
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, usage - inactive) / MB


# ------------------------------------------------------------------ process tree


def _proc_children_supported() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


_PROC_CHILDREN = _proc_children_supported()


def _child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/*/children (one per thread that forked)."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children  # exited
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                children.extend(int(c) for c in handle.read().split())
        except OSError:
            continue  # the thread ended meanwhile
    return children


def process_tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants.

    Walks /proc/<pid>/task/*/children, which reads only the tree itself;
    psutil's children(recursive=True) scans every process on the system
    (~6 ms with ~100 processes here) and is the fallback for kernels
    without CONFIG_PROC_CHILDREN.
    """
    if not _PROC_CHILDREN:
        try:
            return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return [pid]
    pids = [pid]
    index = 0
    while index < len(pids):
        pids.extend(_child_pids(pids[index]))
        index += 1
    return pids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0  # the process exited between listing and reading


def process_tree_rss_mb(pid: int) -> float:
    """RSS of `pid` plus all its descendants, in MB.

    RSS, not USS: USS needs /proc/<pid>/smaps_rollup, ~7 ms per torch
    process against ~0.1 ms for statm, too slow to sample several times a
    second. RSS counts pages shared between daemon and training child (torch
    libraries, copy-on-write pages) twice, so it over-estimates by that
    shared part (~90 MB per torch process measured here): the safe direction
    for a budget that must never be exceeded.
    """
    return sum(_rss_bytes(p) for p in process_tree_pids(pid)) / MB


def _smaps_rollup_kb(pid: int | str, fields: tuple[str, ...]) -> int | None:
    """Sum of `fields` ("Pss:", ...) of /proc/<pid>/smaps_rollup in kB; None when the process is
    gone or the kernel has no smaps_rollup."""
    total, seen = 0, False
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith(fields):
                    total += int(line.split()[1])
                    seen = True
    except (OSError, ValueError, IndexError):
        return None
    return total if seen else None


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size of `pid` (shared pages split between the processes mapping them)."""
    kb = _smaps_rollup_kb(pid, ("Pss:",))
    return None if kb is None else kb * 1024


def private_mb(pid: int | str = "self") -> float | None:
    """Pages only `pid` maps (Private_Clean + Private_Dirty), in MB: for a forked worker, what it
    added to the service (its copies of shared pages, its own allocations); None if unreadable."""
    kb = _smaps_rollup_kb(pid, ("Private_Clean:", "Private_Dirty:"))
    return None if kb is None else kb / 1024.0


def _cgroup_holds_only(directory: Path, pids: Sequence[int]) -> bool:
    """Whether every process in the cgroup `directory` is one of `pids` (and it holds some)."""
    try:
        members = {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return False
    return bool(members) and members <= set(pids)


class TreeMemory:
    """What a process tree costs the machine, as the kernel counts it.

    In a memory cgroup that holds the tree and nothing else (a systemd service,
    limited or not), the cgroup's own charge: pages, page tables and kernel
    memory charged to it, less inactive page cache. Elsewhere (a shell, a
    test), the tree's PSS: a page that daemon and training child share counts
    once, split between them, where RSS counts it in each. Reading PSS costs
    ~7 ms per torch process, so it is read every `pss_interval_s` and when
    the tree changes; in between, each process's RSS change since that read
    is added, so an allocation counts at once.
    """

    def __init__(
        self,
        pid: int,
        pss_interval_s: float = 2.0,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_cgroup: Path | None = None,
    ) -> None:
        self.pid = pid
        self.pss_interval_s = pss_interval_s
        self._cgroup_root = cgroup_root
        self._proc_cgroup = proc_cgroup or Path(f"/proc/{pid}/cgroup")
        self._pss_at = float("-inf")
        self._pss_total = 0
        self._rss_at_pss: dict[int, int] = {}
        self.source = "pss"
        self.rss_mb = 0.0

    def own_cgroup(self, pids: Sequence[int]) -> Path | None:
        """The tree's memory cgroup, when it holds the tree alone."""
        layouts = _cgroup_layouts(self._cgroup_root, self._proc_cgroup)
        if not layouts or layouts[0].directory == layouts[0].mount:
            return None  # the root cgroup holds everything
        return layouts[0].directory if _cgroup_holds_only(layouts[0].directory, pids) else None

    def usage_mb(self) -> float:
        """The tree's cost now, in MB (`source` says how it was counted; `rss_mb` is its RSS)."""
        pids = process_tree_pids(self.pid)
        rss = {p: _rss_bytes(p) for p in pids}
        self.rss_mb = sum(rss.values()) / MB
        directory = self.own_cgroup(pids)
        if directory is not None:
            charged = cgroup_usage_mb(directory)
            if charged is not None:
                self.source = "cgroup"
                return charged
        self.source = "pss"
        now = time.monotonic()
        if now - self._pss_at >= self.pss_interval_s or set(rss) != set(self._rss_at_pss):
            total = 0
            for p in pids:
                pss = _pss_bytes(p)
                total += rss[p] if pss is None else pss  # without smaps_rollup, RSS: the safe side
            self._pss_total, self._rss_at_pss, self._pss_at = total, rss, now
        grown = sum(rss[p] - self._rss_at_pss.get(p, 0) for p in pids)
        return max(0, self._pss_total + grown) / MB


def system_available_mb() -> float:
    """MemAvailable: what the kernel could give without swapping, for everyone."""
    return psutil.virtual_memory().available / MB


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of a process; False if unsupported.

    Lets a dry run measure the peak of exactly one micro-batch, which a
    sampling thread would miss when the step is shorter than its period.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int | str = "self") -> float:
    """The kernel's peak RSS (VmHWM) of a process in MB since start or the last reset."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource  # Linux reports ru_maxrss in kB

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_memory() -> bool:
    """Collect garbage and hand freed heap back to the OS; True if malloc_trim ran.

    glibc keeps freed arena memory mapped, so RSS stays high after a stopped
    update until malloc_trim(0) returns it. Other libcs (musl) have no trim.
    """
    gc.collect()
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


# ------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class PressurePolicy:
    """Thresholds (shares of the budget) and the rule that moves between levels.

    Going up is immediate. Going down from a level needs the share below that
    level's threshold minus `hysteresis`, so usage hovering at a threshold
    does not flap. System MemAvailable below `min_available_mb` (memory taken
    by other processes on the device) is critical, below twice that is high;
    those are left only once MemAvailable is `available_margin` above them.
    """

    elevated: float = 0.70
    high: float = 0.80
    critical: float = 0.95
    hysteresis: float = 0.05
    min_available_mb: float = 64.0
    available_margin: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.elevated < self.high < self.critical:
            raise ValueError(f"thresholds must satisfy 0 < elevated < high < critical, got {self}")
        if not 0 <= self.hysteresis < self.elevated:
            raise ValueError(f"hysteresis must be in [0, elevated), got {self.hysteresis}")
        if self.min_available_mb < 0 or self.available_margin < 0:
            raise ValueError("min_available_mb and available_margin must be >= 0")

    @classmethod
    def from_config(cls, memory: Any) -> PressurePolicy:
        """Built from the `[memory]` config section."""
        return cls(memory.elevated, memory.high, memory.critical, memory.hysteresis, memory.min_available_mb)

    def threshold(self, level: Level) -> float:
        """Share of the budget at which `level` is entered (0 for normal)."""
        return {Level.NORMAL: 0.0, Level.ELEVATED: self.elevated, Level.HIGH: self.high, Level.CRITICAL: self.critical}[
            level
        ]

    def _available_threshold(self, level: Level) -> float:
        return {Level.CRITICAL: self.min_available_mb, Level.HIGH: 2 * self.min_available_mb}.get(level, 0.0)

    def _level_for(self, fraction: float, available_mb: float) -> Level:
        by_share = Level.NORMAL
        for level in (Level.ELEVATED, Level.HIGH, Level.CRITICAL):
            if fraction >= self.threshold(level):
                by_share = level
        by_available = Level.NORMAL
        if available_mb < self._available_threshold(Level.CRITICAL):
            by_available = Level.CRITICAL
        elif available_mb < self._available_threshold(Level.HIGH):
            by_available = Level.HIGH
        return max(by_share, by_available)

    def _may_leave(self, level: Level, fraction: float, available_mb: float) -> bool:
        share_ok = fraction < self.threshold(level) - self.hysteresis
        available_ok = available_mb >= self._available_threshold(level) * (1 + self.available_margin)
        return share_ok and available_ok

    def next_level(self, current: Level, fraction: float, available_mb: float) -> Level:
        """The level after a sample of `fraction` (usage / budget) and system MemAvailable."""
        target = self._level_for(fraction, available_mb)
        if target >= current:
            return target
        level = current
        while level > target and self._may_leave(level, fraction, available_mb):
            level = Level(level - 1)
        return level


# ------------------------------------------------------------------ shared level


class SharedLevel:
    """The pressure level in shared memory, readable by a training child.

    Pass it to a `multiprocessing` child as a Process argument (it travels
    with the child whatever the start method); reading is one memory load,
    cheap enough for every micro-batch boundary. A single int needs no lock.
    """

    def __init__(self, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context()
        self._value = ctx.RawValue(ctypes.c_int, int(Level.NORMAL))

    def get(self) -> Level:
        return Level(self._value.value)

    def set(self, level: Level) -> None:
        self._value.value = int(level)

    def __call__(self) -> Level:
        return self.get()


# ---------------------------------------------------------------------- watchdog

LevelListener = Callable[[Level, Level], None]


class MemoryWatchdog:
    """A thread sampling the service's memory and keeping the pressure level.

    Usage is what the kernel counts: where the binding limit is a cgroup's,
    that cgroup's working set (what its OOM killer compares with the limit);
    otherwise the watched process tree's own cost (`TreeMemory`: its
    cgroup's charge when the cgroup holds it alone, else its PSS). Every
    level change is logged and passed to the listeners `(old, new)`, which
    run on the watchdog thread and must be quick.
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
    ) -> None:
        if sample_interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s}")
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
        self.heartbeat = 0.0
        self.samples = 0

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

    def snapshot(self) -> dict[str, Any]:
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
        cgroup_mb = cgroup_usage_mb(self._budget.cgroup_dir) if self._budget.cgroup_dir is not None else None
        if cgroup_mb is not None:
            rss = process_tree_rss_mb(self.pid)
            self._usage_mb, self._usage_source = cgroup_mb, "cgroup limit"
        else:
            self._usage_mb, self._usage_source = self._tree.usage_mb(), self._tree.source
            rss = self._tree.rss_mb
        self._rss_mb = rss
        self._cgroup_mb = cgroup_mb
        self._available_mb = system_available_mb()
        self._peak_rss_mb = max(self._peak_rss_mb, rss)
        self._peak_usage_mb = max(self._peak_usage_mb, self._usage_mb)
        old = self._level
        new = self.policy.next_level(old, self.fraction, self._available_mb)
        self.samples += 1
        self.heartbeat = now
        if new != old:
            self._level = new
            self.shared_level.set(new)
            self._announce(old, new)
        return new

    def _announce(self, old: Level, new: Level) -> None:
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
        while not self._stop.wait(self.sample_interval_s):
            try:
                self.sample()
            except Exception:
                # A failed sample must not end the watchdog: training would
                # then run unguarded. Log and keep the last level.
                log.exception("memory sample failed")
        log.info("memory watchdog stopped")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> MemoryWatchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- planning


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def tighten(plan: TrainingPlan, level: Level) -> TrainingPlan | None:
    """The plan for `level`, never looser than `plan`; None means stop the update.

    elevated: gradient checkpointing on. high: micro-batch halved (to the
    largest divisor of the effective batch at or below half, so the effective
    batch stays exact), accumulation raised to match, 8-bit optimizer state
    and checkpointing. Each call at high halves again: the caller decides how
    often to apply it (PlanGovernor: once per entry into high).
    """
    if level >= Level.CRITICAL:
        return None
    if level == Level.HIGH:
        effective = plan.effective_batch
        micro = _largest_divisor_at_most(effective, plan.micro_batch // 2)
        return TrainingPlan(micro, effective // micro, True, "adamw8bit")
    if level == Level.ELEVATED:
        return plan if plan.checkpointing else replace(plan, checkpointing=True)
    return plan


def _at_least_as_tight(candidate: TrainingPlan, plan: TrainingPlan) -> bool:
    return (
        candidate.micro_batch <= plan.micro_batch
        and (candidate.checkpointing or not plan.checkpointing)
        and (candidate.optimizer == "adamw8bit" or plan.optimizer == "adamw")
    )


def plan_candidates(effective_batch: int, max_micro: int) -> list[TrainingPlan]:
    """The ladder, loosest first: full micro fp32 state, + checkpointing, then halving with 8-bit state to micro 1."""
    if effective_batch < 1 or max_micro < 1:
        raise ValueError(f"effective_batch and max_micro must be >= 1, got {effective_batch}, {max_micro}")
    micro = _largest_divisor_at_most(effective_batch, max_micro)
    ladder = [
        TrainingPlan(micro, effective_batch // micro, False, "adamw"),
        TrainingPlan(micro, effective_batch // micro, True, "adamw"),
    ]
    while micro > 1:
        tighter = tighten(ladder[-1], Level.HIGH)
        assert tighter is not None
        ladder.append(tighter)
        micro = tighter.micro_batch
    if len(ladder) == 2:
        # micro 1 already: 8-bit state is the only step left.
        ladder.append(TrainingPlan(1, effective_batch, True, "adamw8bit"))
    return ladder


# How many times a micro-batch's activations grow when checkpointing is dropped (measured on the
# large model at micro-batch 32: +455 MB with, +904 MB without); used to predict before a dry run.
CHECKPOINTING_SAVES = 2.0


def plan_limit_mb(serving_mb: float, budget_mb: float, critical: float, update_share: float) -> float:
    """Where an update's predicted peak must stay: within `update_share` of the service's usage
    before the update (`serving_mb`) above it, so that a roomy budget does not buy a plan many
    times the serving footprint, and under the critical threshold, where it would stop. Not under
    elevated: under a tight limit the service serves above it, and the plan would always be the
    tightest (micro-batch 1, twice the wall time); the watchdog tightens a plan that crosses it."""
    return min(critical * budget_mb, serving_mb * (1.0 + update_share))


def choose_start_plan(
    candidates: Sequence[TrainingPlan],
    measure_peak_mb: Callable[[TrainingPlan], float],
    baseline_mb: float,
    limit_mb: float,
) -> TrainingPlan:
    """The loosest candidate whose one-micro-batch dry run stays under `limit_mb` (`plan_limit_mb`).

    `measure_peak_mb(plan)` returns the MB a dry run of one micro-batch adds
    above `baseline_mb` (the service's usage with the worker's data and model
    loaded). A dry run
    costs what it measures, and the loosest plan's can be several times the
    tightest's (large model: +209 MB at 8x4 with checkpointing, +904 MB at
    32x1 without), so candidates are measured from the tightest up, and a
    looser one only where its predicted cost fits: the last measured cost
    scaled by the micro-batch ratio, times CHECKPOINTING_SAVES where it drops
    checkpointing. Measuring stops at the first that does not fit, predicted
    or measured. Where twice the loosest's predicted cost fits, it is measured
    right after the tightest. If even the tightest does not fit, it is
    returned (logged): the watchdog stops it if it reaches critical.
    """
    if not candidates:
        raise ValueError("no candidate plans")

    def predicted(plan: TrainingPlan, measured: TrainingPlan, cost: float) -> float:
        scaled = cost * plan.micro_batch / measured.micro_batch
        return scaled * CHECKPOINTING_SAVES if measured.checkpointing and not plan.checkpointing else scaled

    def dry_run(plan: TrainingPlan) -> tuple[float, bool]:
        cost = measure_peak_mb(plan)
        fits = baseline_mb + cost < limit_mb
        log.info(
            "plan %s: dry run +%.0f MB over %.0f MB baseline, %s the %.0f MB limit",
            plan.describe(), cost, baseline_mb, "under" if fits else "over", limit_mb,
        )  # fmt: skip
        return cost, fits

    tightest, loosest = candidates[-1], candidates[0]
    last_cost, fits = dry_run(tightest)
    chosen: TrainingPlan | None = tightest if fits else None
    # Where there is room for twice what the loosest is predicted to cost (the usual case: a small
    # model, a roomy budget), it is dry-run next: two dry runs, not the whole ladder.
    if chosen is not None and loosest != tightest and baseline_mb + 2 * predicted(loosest, tightest, last_cost) < limit_mb:
        if dry_run(loosest)[1]:
            return loosest
    for plan in reversed(candidates[:-1]):
        if chosen is None:
            break
        guess = predicted(plan, chosen, last_cost)
        if baseline_mb + guess >= limit_mb:
            log.info("plan %s: predicted +%.0f MB over %.0f MB baseline, over the %.0f MB limit: not tried", plan.describe(), guess, baseline_mb, limit_mb)
            break
        cost, fits = dry_run(plan)
        if not fits:
            break
        chosen, last_cost = plan, cost
    if chosen is None:
        log.warning("no plan fits under %.0f MB; starting with the tightest %s", limit_mb, candidates[-1].describe())
        return candidates[-1]
    return chosen


@dataclass(frozen=True)
class UpdateOutcome:
    """What happened to the plan during one update (sent back from a training child)."""

    start_plan: TrainingPlan
    final_plan: TrainingPlan
    worst_level: Level
    stopped: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "start_plan": self.start_plan.to_dict(),
            "final_plan": self.final_plan.to_dict(),
            "worst_level": self.worst_level.label,
            "stopped": self.stopped,
        }


@dataclass
class PlanGovernor:
    """Turns the pressure level into plans: tighten during an update, loosen slowly between.

    Daemon side: `next_start_plan()` / `start_candidates()`, `may_start()`,
    `begin_update(plan)`, then `end_update(outcome)`. Trainer side (in the
    daemon or, pickled with a SharedLevel reader, in the training child):
    `plan_source(plan)` and `should_stop()` at every micro-batch boundary,
    then `outcome()`.

    Within an update a plan only ever tightens: each rise of the level
    applies that level's tightening once; critical stops. Between updates a
    calm update (never above normal) loosens the start plan one ladder step;
    one that needed tightening starts the next where it ended; one stopped
    for memory backs off (`retry_after_s`, doubling) and retries with the
    tightest plan.
    """

    level_reader: Callable[[], Level]
    ladder: Sequence[TrainingPlan] = ()
    retry_base_s: float = 300.0
    retry_max_s: float = 3600.0
    stop_event: Any = None  # threading.Event / multiprocessing.Event: shutdown
    clock: Callable[[], float] = time.monotonic
    _start_index: int = field(default=0, init=False)
    _failures: int = field(default=0, init=False)
    _retry_at: float = field(default=0.0, init=False)
    _start_plan: TrainingPlan | None = field(default=None, init=False)
    _plan: TrainingPlan | None = field(default=None, init=False)
    _acted: Level = field(default=Level.NORMAL, init=False)
    _worst: Level = field(default=Level.NORMAL, init=False)
    _stopped: bool = field(default=False, init=False)
    _history: list[tuple[Level, TrainingPlan | None]] = field(default_factory=list, init=False)

    def __getstate__(self) -> dict[str, Any]:
        # The clock (time.monotonic) pickles by name; history stays behind.
        state = dict(self.__dict__)
        state["_history"] = []
        return state

    @classmethod
    def from_config(
        cls, memory: Any, level_reader: Callable[[], Level], ladder: Sequence[TrainingPlan] = (), stop_event: Any = None
    ) -> PlanGovernor:
        """Built from the `[memory]` config section (back-off times)."""
        return cls(level_reader, ladder, memory.retry_after_s, memory.retry_max_s, stop_event)

    # -- between updates (daemon) -------------------------------------------

    def _require_ladder(self) -> Sequence[TrainingPlan]:
        if not self.ladder:
            raise ValueError("PlanGovernor needs a ladder (plan_candidates(...)) for start plans")
        return self.ladder

    def next_start_plan(self) -> TrainingPlan:
        """The loosest plan the next update may start with."""
        return self._require_ladder()[self._start_index]

    def start_candidates(self) -> list[TrainingPlan]:
        """Ladder from `next_start_plan()` down, for `choose_start_plan`."""
        return list(self._require_ladder()[self._start_index :])

    @property
    def retry_after_s(self) -> float:
        """Seconds until an update may start again after a memory stop (0 = now)."""
        return max(0.0, self._retry_at - self.clock())

    def may_start(self) -> bool:
        return self.retry_after_s <= 0

    def begin_update(self, plan: TrainingPlan) -> None:
        self._start_plan = plan
        self._plan = plan
        self._acted = Level.NORMAL
        self._worst = Level.NORMAL
        self._stopped = False
        self._history = []

    def end_update(self, outcome: UpdateOutcome | None = None) -> None:
        """Record how the update went (`outcome` from the child, or this object's own)."""
        outcome = outcome or self.outcome()
        ladder = self.ladder
        if outcome.stopped:
            self._failures += 1
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (self._failures - 1))
            self._retry_at = self.clock() + delay
            if ladder:
                self._start_index = len(ladder) - 1
            log.warning(
                "update stopped for memory (worst level %s); retry in %.0f s with the tightest plan",
                outcome.worst_level.label,
                delay,
            )
        else:
            self._failures = 0
            self._retry_at = 0.0
            if ladder:
                if outcome.worst_level == Level.NORMAL:
                    self._start_index = max(0, self._start_index - 1)
                else:
                    self._start_index = max(self._start_index, self._ladder_index(outcome.final_plan))
            if ladder:
                log.info("next update starts with %s", self.next_start_plan().describe())
        self._plan = None

    def _ladder_index(self, plan: TrainingPlan) -> int:
        for index, candidate in enumerate(self.ladder):
            if _at_least_as_tight(candidate, plan):
                return index
        return len(self.ladder) - 1

    # -- during an update (trainer) ------------------------------------------

    def plan_source(self, plan: TrainingPlan) -> TrainingPlan | None:
        """The plan for the next micro-batch given the current one; None = stop now."""
        if self._plan is None:
            self.begin_update(plan)
        level = self.level_reader()
        self._worst = max(self._worst, level)
        if level >= Level.CRITICAL:
            if not self._stopped:
                log.warning("memory critical: stopping the update at this micro-batch boundary")
            self._stopped = True
            self._history.append((level, None))
            return None
        new_plan = plan
        if level > self._acted:
            new_plan = tighten(plan, level)
            assert new_plan is not None
        # Re-entering a level later (after the level fell back) acts again.
        self._acted = level
        if new_plan != plan:
            log.info("memory %s: plan %s -> %s", level.label, plan.describe(), new_plan.describe())
            self._history.append((level, new_plan))
        self._plan = new_plan
        return new_plan

    def should_stop(self) -> bool:
        """True on shutdown or at critical memory."""
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        if self.level_reader() >= Level.CRITICAL:
            self._worst = Level.CRITICAL
            self._stopped = True
            return True
        return False

    @property
    def current_plan(self) -> TrainingPlan | None:
        """The plan of the running update (for status), None between updates."""
        return self._plan

    @property
    def changes(self) -> list[tuple[Level, TrainingPlan | None]]:
        """(level, new plan) for every plan change of this update; None = stopped."""
        return list(self._history)

    def outcome(self) -> UpdateOutcome:
        start = self._start_plan
        assert start is not None, "outcome() before begin_update()/plan_source()"
        return UpdateOutcome(start, self._plan or start, self._worst, self._stopped)
