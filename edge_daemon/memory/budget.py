"""The memory budget: the configured limit, the cgroup v1/v2 limit or the machine's RAM.

Also reads a memory cgroup's working set: where the binding limit is a
cgroup's, that is the number the kernel's OOM killer compares with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 1024 * 1024
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX * page size (~2**63); any
# value this large cannot be a real limit on a device.
_UNLIMITED_BYTES = 1 << 60


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
