"""Memory watchdog: budget, pressure levels, plan tightening, real pressure and real limits.

The real-pressure tests drive the level with tests/memhog.py, a child process
holding touched memory; the real-limit test runs a process inside a memory
cgroup it creates (skipped where this machine cannot create one).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_daemon.config import MemoryConfig
from edge_daemon.training.governor import PlanGovernor, UpdateOutcome
from edge_daemon.memory.budget import Budget, cgroup_usage_mb, memory_budget
from edge_daemon.memory.pressure import Level, PressurePolicy, SharedLevel
from edge_daemon.memory.usage import (
    TreeMemory,
    peak_rss_mb,
    process_tree_pids,
    process_tree_rss_mb,
    release_memory,
    reset_peak_rss,
)
from edge_daemon.memory.watchdog import FAILURE_LOG_INTERVAL_S, MAX_FAILURES_IN_A_ROW, MemoryWatchdog
from edge_daemon.training.plan import TrainingPlan, choose_start_plan, plan_candidates, plan_limit_mb, tighten
from tests.cgroups import MB, MemoryCgroup, create_memory_cgroup

MEMHOG = Path(__file__).with_name("memhog.py")
N, E, H, C = Level.NORMAL, Level.ELEVATED, Level.HIGH, Level.CRITICAL
POLICY = PressurePolicy(elevated=0.70, high=0.80, critical=0.90, hysteresis=0.05, min_available_mb=64.0)
PLENTY = 10_000.0  # MB of MemAvailable: no system pressure
# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


# ------------------------------------------------------------------ levels


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, N), (0.6999, N), (0.70, E), (0.7999, E), (0.80, H), (0.8999, H), (0.90, C), (1.5, C)],
)
def test_thresholds_from_normal(fraction: float, expected: Level) -> None:
    assert POLICY.next_level(N, fraction, PLENTY) == expected


def test_hysteresis_sequence_gives_exact_levels() -> None:
    fractions = [0.50, 0.72, 0.68, 0.66, 0.64, 0.85, 0.79, 0.76, 0.74, 0.95, 0.89, 0.86, 0.84, 0.20, 0.71, 0.69]
    expected = [N, E, E, E, N, H, H, H, E, C, C, C, H, N, E, E]
    level, levels = N, []
    for fraction in fractions:
        level = POLICY.next_level(level, fraction, PLENTY)
        levels.append(level)
    assert levels == expected


def test_hovering_at_a_threshold_does_not_flap() -> None:
    # Noise of +-3 % around the elevated threshold: one rise, no fall.
    level, changes = N, 0
    for i in range(200):
        fraction = 0.70 + (0.03 if i % 2 else -0.03)
        new = POLICY.next_level(level, fraction, PLENTY)
        changes += new != level
        level = new
    assert (level, changes) == (E, 1)


def test_low_system_available_memory_is_pressure() -> None:
    assert POLICY.next_level(N, 0.1, 50.0) == C  # < min_available_mb
    assert POLICY.next_level(N, 0.1, 100.0) == H  # < 2 x min
    assert POLICY.next_level(N, 0.1, 130.0) == N
    # Leaving needs MemAvailable 25 % above the threshold: 64 -> 80, 128 -> 160.
    assert POLICY.next_level(C, 0.1, 70.0) == C
    assert POLICY.next_level(C, 0.1, 90.0) == H
    assert POLICY.next_level(H, 0.1, 150.0) == H
    assert POLICY.next_level(H, 0.1, 170.0) == N
    # Share and availability combine: the worse one wins.
    assert POLICY.next_level(N, 0.95, PLENTY) == C
    assert POLICY.next_level(N, 0.75, 100.0) == H


def test_policy_rejects_unordered_thresholds() -> None:
    with pytest.raises(ValueError, match="elevated < high < critical"):
        PressurePolicy(elevated=0.8, high=0.7, critical=0.9)
    with pytest.raises(ValueError, match="hysteresis"):
        PressurePolicy(hysteresis=0.8)


def test_policy_from_config() -> None:
    memory = MemoryConfig(elevated=0.6, high=0.75, critical=0.85, hysteresis=0.02, min_available_mb=32)
    assert PressurePolicy.from_config(memory) == PressurePolicy(0.6, 0.75, 0.85, 0.02, 32.0)


# ------------------------------------------------------------------ budget


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_machine(tmp_path: Path, proc_cgroup: str, total_mb: int = 2048) -> tuple[Path, Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir(parents=True)
    _write(tmp_path / "proc-self-cgroup", proc_cgroup)
    _write(tmp_path / "meminfo", f"MemTotal:       {total_mb * 1024} kB\nMemFree:        1000 kB\n")
    return root, tmp_path / "proc-self-cgroup", tmp_path / "meminfo"


def test_budget_cgroup_v2_memory_max_high_and_ancestors(tmp_path: Path) -> None:
    root, proc, meminfo = _fake_machine(tmp_path, "0::/system.slice/edge-daemon.service\n")
    _write(root / "cgroup.controllers", "cpu memory pids\n")
    service = root / "system.slice" / "edge-daemon.service"
    _write(service / "memory.max", f"{512 * MB}\n")
    _write(service / "memory.high", "max\n")
    _write(root / "system.slice" / "memory.max", "max\n")

    budget = memory_budget(None, root, proc, meminfo)
    assert budget.mb == 512.0
    assert "cgroup v2 memory.max" in budget.source and budget.cgroup_dir == service

    _write(service / "memory.high", f"{400 * MB}\n")  # throttling starts here
    assert memory_budget(None, root, proc, meminfo).mb == 400.0
    _write(root / "system.slice" / "memory.max", f"{300 * MB}\n")  # the slice bounds its services
    budget = memory_budget(None, root, proc, meminfo)
    assert (budget.mb, budget.cgroup_dir) == (300.0, root / "system.slice")
    assert memory_budget(200.0, root, proc, meminfo) == Budget(200.0, "config [memory] budget_mb")
    assert memory_budget(1000.0, root, proc, meminfo).mb == 300.0


def test_budget_without_limits_is_the_machine(tmp_path: Path) -> None:
    root, proc, meminfo = _fake_machine(tmp_path, "0::/user.slice\n", total_mb=2048)
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "user.slice" / "memory.max", "max\n")
    _write(root / "user.slice" / "memory.high", "max\n")
    assert memory_budget(None, root, proc, meminfo) == Budget(2048.0, "machine MemTotal")
    assert memory_budget(4096.0, root, proc, meminfo).mb == 2048.0


def test_budget_cgroup_v1_limit_and_unlimited_sentinel(tmp_path: Path) -> None:
    hybrid = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n"
    root, proc, meminfo = _fake_machine(tmp_path, hybrid)
    # Hybrid layout: no cgroup.controllers at the root, v1 memory hierarchy.
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "docker" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", f"{256 * MB}\n")
    budget = memory_budget(None, root, proc, meminfo)
    assert budget.mb == 256.0 and "cgroup v1 memory.limit_in_bytes" in budget.source

    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert memory_budget(None, root, proc, meminfo).source == "machine MemTotal"


def test_budget_v1_inside_a_container_without_cgroup_namespace(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host path, the mount is rooted at that cgroup.
    root, proc, meminfo = _fake_machine(tmp_path, "4:memory:/docker/abc\n")
    _write(root / "memory" / "memory.limit_in_bytes", f"{128 * MB}\n")
    budget = memory_budget(None, root, proc, meminfo)
    assert (budget.mb, budget.cgroup_dir) == (128.0, root / "memory")


def test_cgroup_usage_subtracts_inactive_page_cache(tmp_path: Path) -> None:
    root, proc, _ = _fake_machine(tmp_path, "0::/svc\n")
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "svc" / "memory.current", f"{300 * MB}\n")
    _write(root / "svc" / "memory.stat", f"anon {150 * MB}\nactive_file {50 * MB}\ninactive_file {100 * MB}\n")
    assert cgroup_usage_mb(None, root, proc) == 200.0

    root1, proc1, _ = _fake_machine(tmp_path / "v1", "4:memory:/svc\n")
    _write(root1 / "memory" / "svc" / "memory.usage_in_bytes", f"{90 * MB}\n")
    _write(root1 / "memory" / "svc" / "memory.stat", f"cache {40 * MB}\ntotal_inactive_file {30 * MB}\n")
    assert cgroup_usage_mb(None, root1, proc1) == 60.0
    assert cgroup_usage_mb(None, tmp_path / "nowhere", proc1) is None


# ---------------------------------------------------------------- tightening

LOOSE = TrainingPlan(32, 1, False, "adamw")


def test_tighten_per_level() -> None:
    assert tighten(LOOSE, N) == LOOSE
    assert tighten(LOOSE, E) == TrainingPlan(32, 1, True, "adamw")
    assert tighten(LOOSE, H) == TrainingPlan(16, 2, True, "adamw8bit")
    assert tighten(LOOSE, C) is None
    # Halving keeps the effective batch exact, down to micro-batch 1.
    assert tighten(TrainingPlan(12, 2, True, "adamw8bit"), H) == TrainingPlan(6, 4, True, "adamw8bit")
    assert tighten(TrainingPlan(3, 8, True, "adamw8bit"), H) == TrainingPlan(1, 24, True, "adamw8bit")
    assert tighten(TrainingPlan(1, 24, True, "adamw8bit"), H) == TrainingPlan(1, 24, True, "adamw8bit")


def test_plan_candidates_ladder() -> None:
    ladder = plan_candidates(32, 32)
    assert [(p.micro_batch, p.accumulation, p.checkpointing, p.optimizer) for p in ladder] == [
        (32, 1, False, "adamw"),
        (32, 1, True, "adamw"),
        (16, 2, True, "adamw8bit"),
        (8, 4, True, "adamw8bit"),
        (4, 8, True, "adamw8bit"),
        (2, 16, True, "adamw8bit"),
        (1, 32, True, "adamw8bit"),
    ]
    assert [p.micro_batch for p in plan_candidates(24, 16)] == [12, 12, 6, 3, 1]
    assert all(p.effective_batch == 24 for p in plan_candidates(24, 16))
    assert plan_candidates(5, 1)[-1] == TrainingPlan(1, 5, True, "adamw8bit")
    with pytest.raises(ValueError):
        plan_candidates(0, 4)


class ScriptedLevels:
    """A level reader that plays a fixed sequence, one value per read."""

    def __init__(self, levels: list[Level]) -> None:
        self.levels = list(levels)
        self.last = N

    def __call__(self) -> Level:
        if self.levels:
            self.last = self.levels.pop(0)
        return self.last


def _tightness(plan: TrainingPlan) -> tuple[int, bool, bool]:
    return (-plan.micro_batch, plan.checkpointing, plan.optimizer == "adamw8bit")


def test_governor_tightens_once_per_rise_and_never_loosens_mid_update() -> None:
    levels = [N, E, E, H, H, E, N, N, H, E, C]
    governor = PlanGovernor(ScriptedLevels(levels))
    governor.begin_update(LOOSE)
    plan: TrainingPlan | None = LOOSE
    plans: list[TrainingPlan | None] = []
    for _ in levels:
        assert plan is not None
        plan = governor.plan_source(plan)
        plans.append(plan)
    ckpt, half, quarter = TrainingPlan(32, 1, True, "adamw"), TrainingPlan(16, 2, True, "adamw8bit"), TrainingPlan(8, 4, True, "adamw8bit")
    assert plans == [LOOSE, ckpt, ckpt, half, half, half, half, half, quarter, quarter, None]
    kept = [p for p in plans if p is not None]
    assert all(_tightness(b) >= _tightness(a) for a, b in zip(kept, kept[1:]))
    assert [(lvl, p) for lvl, p in governor.changes] == [(E, ckpt), (H, half), (H, quarter), (C, None)]
    assert governor.outcome() == UpdateOutcome(LOOSE, quarter, C, True)


def test_governor_between_updates_loosens_slowly_and_backs_off() -> None:
    now = [1000.0]
    level = [N]
    ladder = plan_candidates(32, 32)
    governor = PlanGovernor(lambda: level[0], ladder, retry_base_s=60, retry_max_s=200, clock=lambda: now[0])
    assert governor.next_start_plan() == ladder[0] and governor.may_start()

    def run_update(levels: list[Level]) -> UpdateOutcome:
        plan: TrainingPlan | None = governor.next_start_plan()
        governor.begin_update(plan)
        for lvl in levels:
            level[0] = lvl
            assert plan is not None
            plan = governor.plan_source(plan)
            if plan is None:
                break
        outcome = governor.outcome()
        governor.end_update()
        return outcome

    # An update that hit high ends at 16x2; the next starts there, not looser.
    assert run_update([N, H, N]).final_plan == ladder[2]
    assert governor.next_start_plan() == ladder[2]
    # Stopped at critical: back off 60 s, then retry with the tightest plan.
    assert run_update([N, C]).stopped
    assert governor.retry_after_s == 60 and not governor.may_start()
    assert governor.next_start_plan() == ladder[-1]
    now[0] += 61
    assert governor.may_start()
    assert run_update([C]).stopped
    assert governor.retry_after_s == 120  # doubles
    now[0] += 121
    run_update([C])
    assert governor.retry_after_s == 200  # capped
    now[0] += 201
    # Calm updates loosen one ladder step each; the back-off resets.
    for expected in (ladder[-2], ladder[-3], ladder[-4]):
        run_update([N, N])
        assert governor.next_start_plan() == expected and governor.retry_after_s == 0
    assert governor.start_candidates() == ladder[-4:]


def test_governor_should_stop_on_shutdown_and_critical() -> None:
    import threading

    level = [N]
    stop = threading.Event()
    governor = PlanGovernor(lambda: level[0], stop_event=stop)
    governor.begin_update(LOOSE)
    assert not governor.should_stop()
    stop.set()
    assert governor.should_stop() and not governor.outcome().stopped  # shutdown is not a memory stop
    stop.clear()
    level[0] = C
    assert governor.should_stop() and governor.outcome().stopped


def test_choose_start_plan_takes_the_loosest_that_fits() -> None:
    ladder = plan_candidates(32, 32)  # 32x1, 32x1 ckpt, 16x2 ckpt 8-bit, 8x4, 4x8, 2x16, 1x32
    cost_mb = {ladder[0]: 900.0, ladder[1]: 420.0, ladder[2]: 250.0, ladder[3]: 150.0}
    measured: list[TrainingPlan] = []

    def measure(plan: TrainingPlan) -> float:
        measured.append(plan)
        return cost_mb.get(plan, 100.0)

    # A limit of 700 MB; baseline 400 leaves < 300 MB. Measured from the
    # tightest up; 16x2 is predicted at 2 x 150 = 300 MB from 8x4's cost and not dry-run.
    chosen = choose_start_plan(ladder, measure, baseline_mb=400, limit_mb=700)
    assert chosen == ladder[3]
    assert measured == ladder[3:][::-1]
    # Baseline 100: 32x1 with checkpointing fits (420 MB); without it is predicted at 2 x 420 MB
    # and never dry-run, though its 900 MB would have been measured first before.
    measured.clear()
    assert choose_start_plan(ladder, measure, baseline_mb=100, limit_mb=700) == ladder[1]
    assert ladder[0] not in measured and measured == ladder[1:][::-1]
    # Nothing fits: the tightest, the only plan measured.
    measured.clear()
    assert choose_start_plan(ladder, measure, baseline_mb=650, limit_mb=700) == ladder[-1]
    assert measured == [ladder[-1]]
    # A looser plan measured over the line (its prediction fitted) stops the climb at the one before.
    measured.clear()
    cost_mb[ladder[2]] = 500.0
    assert choose_start_plan(ladder, measure, baseline_mb=100, limit_mb=700) == ladder[2]
    cost_mb[ladder[2]] = 750.0
    measured.clear()
    assert choose_start_plan(ladder, measure, baseline_mb=0, limit_mb=700) == ladder[3]
    assert measured[-1] == ladder[2]
    # Room for twice the loosest's predicted cost (100 MB x 32 x 2 for checkpointing): the tightest,
    # then the loosest, two dry runs.
    measured.clear()
    assert choose_start_plan(ladder, measure, baseline_mb=0, limit_mb=14_000) == ladder[0]
    assert measured == [ladder[-1], ladder[0]]


def test_the_plan_limit_is_the_update_share_of_serving_under_a_roomy_budget_and_critical_under_a_tight_one() -> None:
    # 200 MB serving in 16 GB: a 15% share (230 MB), not 95% of the budget (15.6 GB), bounds the plan.
    assert plan_limit_mb(200.0, 16_384.0, 0.95, 0.15) == pytest.approx(230.0)
    # Under a 250 MB limit the service serves at 80% (above elevated): the share still bounds it.
    assert plan_limit_mb(200.0, 250.0, 0.95, 0.15) == pytest.approx(230.0)
    # Under a 220 MB limit the critical line (209 MB) does.
    assert plan_limit_mb(200.0, 220.0, 0.95, 0.15) == pytest.approx(209.0)
    ladder = plan_candidates(32, 32)
    chosen = choose_start_plan(ladder, lambda p: 1.0 * p.micro_batch, 210.0, plan_limit_mb(200.0, 16_384.0, 0.95, 0.15))
    assert chosen.micro_batch == 16  # 210 + 16 MB fits under 230 MB, 210 + 32 does not


# ----------------------------------------------------------- process memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_memory_returns_freed_heap_to_the_os() -> None:
    before = process_tree_rss_mb(os.getpid())
    # 100k small buffers come from the malloc heap; keeping the last one pins
    # the top of the heap, so free() alone cannot give the rest back.
    blocks = [bytes(1024) + bytes([i % 256]) for i in range(100_000)]
    keep = blocks[-1]
    del blocks
    import gc

    gc.collect()
    held = process_tree_rss_mb(os.getpid())
    assert release_memory() is True
    after = process_tree_rss_mb(os.getpid())
    assert held - after > 60, (before, held, after)
    assert keep


def test_peak_rss_can_be_reset_to_measure_one_step() -> None:
    if not reset_peak_rss():
        pytest.skip("this kernel does not support resetting VmHWM via /proc/self/clear_refs")
    base = peak_rss_mb()
    buffer = bytearray(80 * MB)
    buffer[:: 4096] = b"\x01" * len(range(0, len(buffer), 4096))
    del buffer
    assert peak_rss_mb() - base > 70
    reset_peak_rss()
    assert peak_rss_mb() - base < 20


class MemHog:
    """tests/memhog.py as a child of the test process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(MEMHOG)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.reply = self._read()

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("held "), line
        return line

    @property
    def held_mb(self) -> int:
        return int(self.reply.split()[1])

    def hold(self, mb: float) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"hold {max(0, int(mb))}\n")
        self.proc.stdin.flush()
        self.reply = self._read()
        return self.reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def memhog() -> Iterator[MemHog]:
    hog = MemHog()
    try:
        yield hog
    finally:
        hog.close()


def wait_for(predicate: Callable[[], bool], timeout: float = HANG_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def test_watchdog_snapshot_listeners_and_a_failing_listener(memhog: MemHog) -> None:
    # The hog is a child: the watchdog counts it in the process tree.
    own = process_tree_rss_mb(os.getpid())
    memhog.hold(60)
    watchdog = MemoryWatchdog(POLICY, configured_budget_mb=10_000, sample_interval_s=0.05)
    seen: list[tuple[Level, Level]] = []
    watchdog.add_listener(lambda old, new: 1 / 0)  # must not kill the thread
    watchdog.add_listener(lambda old, new: seen.append((old, new)))
    with watchdog:
        assert watchdog.rss_mb > own + 55
        snapshot = watchdog.snapshot()
        assert set(snapshot) >= {"rss_mb", "budget_mb", "level"}
        assert snapshot["budget_mb"] == 10_000 and snapshot["level"] == "normal"
        json.dumps(snapshot)
        # A budget shrunk at run time (config reload) takes effect on the next sample: to half
        # the usage, so that the share stays critical even if the tree's PSS falls meanwhile (it
        # does when another process maps the same torch libraries).
        assert watchdog.set_configured_budget(watchdog.usage_mb / 2).mb < 0.95 * 10_000
        wait_for(lambda: watchdog.level == C, what="critical after the budget shrank")
        wait_for(lambda: watchdog.samples > 5, what="more samples")
        assert watchdog.alive
        assert watchdog.peak_rss_mb >= watchdog.rss_mb - 1
    assert seen == [(N, C)]
    assert watchdog.shared_level.get() == C
    assert not watchdog.alive


# ------------------------------------------------------------ real pressure


def governed_training_loop(
    governor: PlanGovernor, start: TrainingPlan, reports: multiprocessing.Queue, release: Any
) -> None:
    """Stands in for the trainer in a spawned child: a micro-batch boundary every 20 ms."""
    plan: TrainingPlan | None = start
    governor.begin_update(start)
    reports.put(("ready", None))
    # Until the update stops; `release` ends it sooner when the test is over, and the deadline
    # only keeps an orphaned child from running for ever.
    deadline = time.monotonic() + 10 * HANG_S
    while not release.is_set() and time.monotonic() < deadline:
        assert plan is not None
        new_plan = governor.plan_source(plan)
        if new_plan != plan:
            reports.put(("plan", new_plan))
        plan = new_plan
        if plan is None:
            break
        time.sleep(0.02)
    reports.put(("outcome", governor.outcome()))
    # Stay alive (and resident) until released, so the tree's size holds still.
    release.wait(10 * HANG_S)


def test_real_memory_hog_drives_levels_and_a_governed_child(memhog: MemHog) -> None:
    # The watchdog watches the hog's own process tree, a fresh process whose
    # footprint is only what it is told to hold: the test process's RSS moves
    # with whatever earlier tests left behind and would blur the shares.
    ctx = multiprocessing.get_context("spawn")
    shared = SharedLevel(ctx)
    ladder = plan_candidates(32, 32)
    reports: multiprocessing.Queue = ctx.Queue()
    release = ctx.Event()
    # The training child reads the level from shared memory, as the daemon's will.
    child = ctx.Process(
        target=governed_training_loop, args=(PlanGovernor(shared, ladder), ladder[0], reports, release), name="train-child"
    )

    def report() -> tuple[str, Any]:
        try:
            return reports.get(timeout=HANG_S)  # type: ignore[no-any-return]
        except queue.Empty:
            raise AssertionError(f"no report from the training child within {HANG_S:.0f} s") from None

    child.start()
    try:
        assert report() == ("ready", None)
        # The hog has answered its first command and idles on stdin: its footprint holds still.
        base = process_tree_rss_mb(memhog.proc.pid)  # the hog holding nothing yet
        budget = base + 300
        watchdog = MemoryWatchdog(
            PressurePolicy(0.70, 0.80, 0.90, 0.05, min_available_mb=0),
            configured_budget_mb=budget,
            sample_interval_s=0.05,
            pid=memhog.proc.pid,
            shared_level=shared,
        )
        if watchdog.budget.source != "config [memory] budget_mb":
            pytest.skip(f"a limit below {budget:.0f} MB applies here: {watchdog.budget.source}")
        changes: list[Level] = []
        watchdog.add_listener(lambda old, new: changes.append(new))

        def hold_share(fraction: float) -> None:
            memhog.hold(fraction * budget - base)

        def next_plan() -> TrainingPlan | None:
            kind, plan = report()
            assert kind == "plan", (kind, plan)
            return plan

        with watchdog:
            assert watchdog.level == N
            # The hog's footprint as the watchdog counts it (PSS, which other processes mapping
            # the same libraries lower), so the shares below are the watchdog's own.
            samples = watchdog.samples
            wait_for(lambda: watchdog.samples >= samples + 2, what="a sample of the idle hog")
            base = watchdog.usage_mb
            hold_share(0.75)
            wait_for(lambda: watchdog.level == E, what="elevated")
            assert next_plan() == ladder[1]  # checkpointing on
            hold_share(0.85)
            wait_for(lambda: watchdog.level == H, what="high")
            assert next_plan() == ladder[2]  # micro-batch halved, 8-bit state
            hold_share(0.95)
            wait_for(lambda: watchdog.level == C, what="critical")
            assert next_plan() is None  # the update stops at the next boundary
            kind, outcome = report()
            assert kind == "outcome" and outcome.stopped and outcome.final_plan == ladder[2]
            # Below the critical threshold but within hysteresis: stays critical, on samples
            # taken after the hog shrank (hold() returns once it has).
            hold_share(0.875)  # midway between the hysteresis line (0.85) and critical (0.90)
            samples = watchdog.samples
            wait_for(lambda: watchdog.samples >= samples + 3, what="samples of the shrunk hog")
            assert watchdog.fraction < 0.90 and watchdog.level == C, (watchdog.fraction, watchdog.level)
            peak = watchdog.peak_rss_mb
            memhog.hold(0)
            wait_for(lambda: watchdog.level == N, what="normal after the hog freed")
        # Up one level at a time, then only down (the hog unmaps block by
        # block, so the way down may pass through a level) to normal.
        assert changes[:3] == [E, H, C]
        falling = changes[2:]
        assert all(lower < higher for higher, lower in zip(falling, falling[1:])) and falling[-1] == N
        assert peak >= 0.90 * budget  # critical was reached on a real sample
    finally:
        release.set()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()


# --------------------------------------------------------------- real limit


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup (1 GB limit to start); skips with the reason where none can be made."""
    made = create_memory_cgroup()
    if not isinstance(made, MemoryCgroup):
        pytest.skip(f"cannot create a memory cgroup here: {made}")
    try:
        yield made
    finally:
        made.remove(HANG_S)


# Runs inside the cgroup: reads the budget, then grows in 4 MB steps until
# its watchdog says critical, the point where an update would stop.
_LIMITED_CHILD = r"""
import json, sys
from edge_daemon.memory.budget import cgroup_usage_mb
from edge_daemon.memory.pressure import PressurePolicy
from edge_daemon.memory.watchdog import MemoryWatchdog
print(json.dumps({"ready": True, "cgroup_mb": cgroup_usage_mb()}), flush=True)
sys.stdin.readline()
watchdog = MemoryWatchdog(PressurePolicy(0.70, 0.80, 0.90, 0.05, min_available_mb=0), sample_interval_s=0.05)
levels = []
watchdog.add_listener(lambda old, new: levels.append(new.label))
blocks = []
with watchdog:
    first = watchdog.snapshot()
    while watchdog.sample() < 3 and len(blocks) < 200:
        block = bytearray(4 << 20)
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))
        blocks.append(block)
    last = watchdog.snapshot()
print(json.dumps({"first": first, "last": last, "levels": levels, "grown_mb": 4 * len(blocks)}), flush=True)
"""


def test_watchdog_inside_a_memory_cgroup_reads_its_limit_and_stops_before_oom(memory_cgroup: MemoryCgroup) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _LIMITED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=memory_cgroup.enter_fn(),
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        ready = json.loads(child.stdout.readline())
        assert ready["ready"] and ready["cgroup_mb"] is not None
        footprint = memory_cgroup.usage_mb()
        limit_mb = footprint + 48  # just above what it needs to serve
        memory_cgroup.set_limit_mb(limit_mb)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        child.wait(HANG_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, f"child ended with {child.returncode} (oom kills: {memory_cgroup.oom_kills()})"
    assert memory_cgroup.oom_kills() == 0
    result = json.loads(line)
    first, last = result["first"], result["last"]
    assert abs(first["budget_mb"] - limit_mb) < 0.2
    assert first["budget_source"].startswith(f"cgroup v{memory_cgroup.version}")
    assert first["cgroup_mb"] is not None and first["level"] == "normal"
    # It grew until critical (>= 90 % of the limit) and was never killed.
    assert result["levels"][-1] == "critical" and last["usage_mb"] >= 0.9 * limit_mb
    assert result["grown_mb"] >= 16


# --------------------------------------------------------------- as the kernel counts it


def _touched(mb: int) -> bytearray:
    block = bytearray(mb << 20)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    return block


def test_outside_a_cgroup_of_its_own_a_tree_costs_its_pss_not_its_rss(tmp_path: Path) -> None:
    """A forked child shares the parent's pages: RSS counts them in both, the kernel once."""
    from edge_daemon.memory.usage import _pss_bytes

    block = _touched(200)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits, sharing the 200 MB copy-on-write
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    try:
        tree = TreeMemory(os.getpid(), proc_cgroup=tmp_path / "no-cgroup")
        usage = tree.usage_mb()
        assert tree.source == "pss"
        pss = sum(_pss_bytes(p) or 0 for p in process_tree_pids(os.getpid())) / MB
        assert abs(usage - pss) < 0.05 * pss
        assert tree.rss_mb > usage + 150, (tree.rss_mb, usage)  # RSS counts the 200 MB twice
        # Between PSS reads, a new allocation counts at once, in full.
        more = _touched(100)
        assert tree.usage_mb() > usage + 90
        del more
    finally:
        os.write(write_end, b"x")
        os.waitpid(child, 0)
        del block


# Runs alone in a memory cgroup without a limit, as a systemd service does: the watchdog counts the
# cgroup's charge, which the test reads from the kernel at the same moment.
_SERVICE_CHILD = r"""
import json, sys
from edge_daemon.memory.pressure import PressurePolicy
from edge_daemon.memory.watchdog import MemoryWatchdog
block = bytearray(64 << 20)
block[::4096] = b"\x01" * len(range(0, len(block), 4096))
watchdog = MemoryWatchdog(PressurePolicy(0.70, 0.80, 0.90, 0.05, min_available_mb=0), configured_budget_mb=4000)
watchdog.sample()
print(json.dumps(watchdog.snapshot()), flush=True)
sys.stdin.readline()
"""


def test_alone_in_its_cgroup_the_service_costs_the_cgroups_charge(memory_cgroup: MemoryCgroup) -> None:
    memory_cgroup.limit_file.write_text("max" if memory_cgroup.version == 2 else "-1")  # a service without MemoryMax
    child = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=memory_cgroup.enter_fn(), cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        snapshot = json.loads(child.stdout.readline())
        kernel = cgroup_usage_mb(memory_cgroup.path)
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(HANG_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert kernel is not None
    assert snapshot["usage_source"] == "cgroup" and snapshot["budget_source"] == "config [memory] budget_mb"
    assert abs(snapshot["usage_mb"] - kernel) < 0.10 * kernel, (snapshot, kernel)


# ---------------------------------------------------------------- liveness


def test_a_watchdog_whose_usage_is_unreadable_goes_critical_then_dead(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # It watches a child; once the child has exited and been reaped, /proc/<pid> is gone and every
    # sample fails for real. No cgroup file names it, so the budget is the config's.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    watchdog = MemoryWatchdog(
        POLICY, configured_budget_mb=10_000, sample_interval_s=0.01, pid=child.pid, proc_cgroup=tmp_path / "no-cgroup"
    )
    seen: list[tuple[Level, Level]] = []
    watchdog.add_listener(lambda old, new: seen.append((old, new)))
    try:
        with caplog.at_level(logging.INFO, logger="edge_daemon.memory.watchdog"), watchdog:
            assert watchdog.level == N and watchdog.alive and watchdog.rss_mb > 0
            assert child.stdin is not None
            child.stdin.close()
            child.wait(HANG_S)
            # Unknown usage is not normal: the level a training worker reads turns critical at the
            # first failure, so a running update stops at its next micro-batch boundary.
            wait_for(lambda: watchdog.shared_level.get() == C, what="the level to turn critical")
            wait_for(lambda: not watchdog.alive, what="the failing watchdog to count as dead")
            assert watchdog.failures == MAX_FAILURES_IN_A_ROW
            assert watchdog.level == C and watchdog.shared_level.get() == C
            assert seen == [(N, C)]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    messages = [r.getMessage() for r in caplog.records]
    # Logged once in full, then at most every FAILURE_LOG_INTERVAL_S: not once per sample.
    failed = [r for r in caplog.records if r.getMessage().startswith("memory sample failed")]
    assert len(failed) == 1 and f"/proc/{child.pid}" in failed[0].getMessage(), messages
    assert "critical" in failed[0].getMessage()
    end = next(r for r in caplog.records if r.getMessage().startswith("memory sampling failed"))
    assert end.getMessage() == f"memory sampling failed {MAX_FAILURES_IN_A_ROW} times in a row; the memory watchdog stops"
    reminders = [m for m in messages if m.startswith("memory sampling still failing")]
    assert len(reminders) <= (end.created - failed[0].created) / FAILURE_LOG_INTERVAL_S, messages


def test_a_watchdog_survives_one_failed_sample_when_its_limiting_cgroup_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real memory cgroup whose limit is the budget, removed under the running watchdog: that
    # sample fails (its usage is unreadable), the budget is re-read at once and the next sample
    # succeeds against the machine's limit.
    made = create_memory_cgroup()
    if not isinstance(made, MemoryCgroup):
        pytest.skip(f"cannot create a memory cgroup here: {made}")
    try:
        made.set_limit_mb(256)
        if made.version == 2:
            mount, line = Path("/sys/fs/cgroup"), "0::/{}"
        else:
            mount, line = Path("/sys/fs/cgroup/memory"), "4:memory:/{}"
        proc_cgroup = tmp_path / "proc-cgroup"
        proc_cgroup.write_text(line.format(made.path.relative_to(mount)) + "\n")
        # No refresh but the one a failure forces.
        watchdog = MemoryWatchdog(POLICY, sample_interval_s=0.01, proc_cgroup=proc_cgroup, budget_refresh_s=100 * HANG_S)
        seen: list[tuple[Level, Level]] = []
        watchdog.add_listener(lambda old, new: seen.append((old, new)))
        with caplog.at_level(logging.INFO, logger="edge_daemon.memory.watchdog"), watchdog:
            assert watchdog.budget.cgroup_dir == made.path and watchdog.usage_source == "cgroup limit"
            assert watchdog.level == N
            made.path.rmdir()  # empty: nothing of the test runs in it
            wait_for(lambda: seen == [(N, C), (C, N)], what="critical for the failed sample, then normal again")
            samples = watchdog.samples
            wait_for(lambda: watchdog.samples > samples + 2, what="samples after the failure")
            assert watchdog.alive and watchdog.failures == 0
            assert watchdog.budget.cgroup_dir is None and watchdog.level == N
    finally:
        if made.path.exists():
            made.remove(HANG_S)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("memory sample failed")]) == 1, messages
    assert "memory sampling recovered after 1 failed sample(s); level normal" in messages


def test_a_watchdog_stuck_in_a_sample_is_dead_until_it_moves_again() -> None:
    # A listener runs on the watchdog's thread: one that blocks holds the loop as a read of /proc
    # or of a cgroup file stuck in the kernel would.
    release, stuck = threading.Event(), threading.Event()

    def wedge(old: Level, new: Level) -> None:
        stuck.set()
        release.wait(HANG_S)

    watchdog = MemoryWatchdog(POLICY, configured_budget_mb=10_000, sample_interval_s=0.01, stale_s=0.3)
    watchdog.add_listener(wedge)
    try:
        with watchdog:
            assert watchdog.alive
            watchdog.set_configured_budget(watchdog.usage_mb / 2)  # the next sample is critical: a level change
            assert stuck.wait(HANG_S)
            wait_for(lambda: not watchdog.alive, what="the stuck watchdog to count as dead")
            release.set()
            wait_for(lambda: watchdog.alive, what="the watchdog to move again")
            assert watchdog.failures == 0
    finally:
        release.set()
