"""Memory cgroups of a test's or benchmark's own (v1 or v2): made, limited, entered, removed.

Only for tests and benchmarks: the daemon reads its cgroup (memory/budget.py) but never makes one.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024


@dataclass
class MemoryCgroup:
    """A memory cgroup of this test's own (v1 or v2), removed afterwards."""

    path: Path
    version: int

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    def set_limit_mb(self, mb: float) -> None:
        self.limit_file.write_text(str(int(mb * MB)))

    def usage_mb(self) -> float:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text()) / MB

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def _stat_mb(self, v2_name: str, v1_name: str) -> float:
        """A `memory.stat` field (v2 name, v1 name) in MB; 0 where the kernel has no such field."""
        name = v2_name if self.version == 2 else v1_name
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value) / MB
        return 0.0

    def inactive_file_mb(self) -> float:
        return self._stat_mb("inactive_file", "total_inactive_file")

    def cache_mb(self) -> float:
        """Page cache of files the group is charged for."""
        return self._stat_mb("file", "total_cache")

    def anon_mb(self) -> float:
        """Anonymous memory the group is charged for (heap, stacks; no page cache of files)."""
        return self._stat_mb("anon", "total_rss")

    def charge_mb(self) -> float:
        """What the kernel charges the group, less inactive page cache (reclaimed before any OOM kill)."""
        return self.usage_mb() - self.inactive_file_mb()

    def peak_mb(self) -> float | None:
        """The kernel's high-water mark of the usage (page cache included), where it keeps one."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text()) / MB
        except (OSError, ValueError):
            return None

    def reset_peak(self) -> None:
        """Restart the high-water mark (v1 only; v2 before 6.12 has no reset)."""
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self, timeout: float) -> None:
        """Kill what is left inside (only processes its owner started can be there) and remove it."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Killed processes leave the cgroup as they exit; until then it cannot be removed.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.path} still busy {timeout:.0f} s after killing its processes") from exc
                time.sleep(0.05)

    def enter_fn(self) -> Callable[[], None]:
        """A `preexec_fn` that moves the new process into this cgroup before it execs.

        Joining before exec matters on v1: pages charged before a move stay
        with the old cgroup (move_charge_at_immigrate is off by default).
        """
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))

        return enter


def _own_cgroup_path(controller_line: Callable[[str, str], bool]) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if controller_line(hier, controllers):
            return path
    return None


def _try_create(parent: Path, version: int) -> MemoryCgroup | str:
    path = parent / f"edge-daemon-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    group = MemoryCgroup(path, version)
    try:
        group.set_limit_mb(1024)
        assert (path / "cgroup.procs").exists()
    except (OSError, AssertionError) as exc:
        path.rmdir()
        return f"cannot set a memory limit in {path}: {exc}"
    return group


def create_memory_cgroup(root: Path = Path("/sys/fs/cgroup")) -> MemoryCgroup | str:
    """A new memory cgroup, or the reason none can be created here."""
    reasons: list[str] = []
    if (root / "cgroup.controllers").exists():  # unified (v2)
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            return "cgroup v2 without the memory controller"
        own = _own_cgroup_path(lambda hier, controllers: hier == "0")
        parents = []
        if own and own != "/":
            parents.append(root / own.lstrip("/"))
        parents.append(root)  # the root is exempt from the no-internal-processes rule
        for parent in parents:
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
            except OSError as exc:
                reasons.append(f"{parent}: cannot enable memory for children: {exc.strerror}")
                continue
            made = _try_create(parent, 2)
            if isinstance(made, MemoryCgroup):
                return made
            reasons.append(made)
        return "; ".join(reasons)
    mount = root / "memory"
    if not (mount / "memory.limit_in_bytes").exists():
        return f"no cgroup v2 at {root} and no v1 memory hierarchy at {mount}"
    own = _own_cgroup_path(lambda hier, controllers: "memory" in controllers.split(","))
    parents = [mount / own.lstrip("/")] if own and own != "/" else []
    parents.append(mount)
    for parent in parents:
        if not parent.is_dir():
            continue
        made = _try_create(parent, 1)
        if isinstance(made, MemoryCgroup):
            return made
        reasons.append(made)
    return "; ".join(reasons) or "no usable v1 memory cgroup directory"
