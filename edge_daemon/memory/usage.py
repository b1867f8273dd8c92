"""Memory use of a process tree as the kernel counts it: RSS, PSS, private pages, peaks.

Also hands freed heap back to the OS (`release_memory`), so that what was
used and released stops counting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from edge_daemon.memory.budget import MB, _cgroup_layouts, cgroup_usage_mb

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


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


# glibc mallopt(3) parameters.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# Blocks from this size up are mapped on their own and unmapped when freed. glibc's default
# threshold rises to the largest block freed so far (up to 32 MB), after which such blocks come
# from the heap, where freed memory stays with the process: a process would keep its largest
# activations' worth of memory after the batch that needed it. Measured on the default model
# (benchmarks/memory.py, a training worker): peak 1.24x serving and 8-9 s at 128 kB, 1.33x and
# 6.4 s at 1 MB, 1.39x and 5.7 s at 4 MB. Forward-only steps on a thread of their own at micro-batch
# 32 (benchmarks/toolbox.py --only in-service): charged 6.7 MB with this and one arena, 14.4 MB with
# glibc's defaults, at 46 ms a step against 28 (each large block mapped and unmapped).
MMAP_THRESHOLD = 128 * 1024


def tight_malloc() -> None:
    """Make freed memory go back to the kernel at once, and every thread share one heap (glibc;
    elsewhere nothing). The daemon sets it first thing at start; the helper and its workers
    inherit it. A thread's own arena keeps what that thread freed: ingestion's, the scheduler's
    and an update's thread would each hold on to their own."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL(libc_name)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


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
