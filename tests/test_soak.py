"""The soak's short run: three days of the sample motor through the real daemon in compressed time,
with broker restarts, two SIGKILLs and retention under a small budget (benchmarks/soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cgroups import MemoryCgroup, create_memory_cgroup

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_three_days_in_minutes_keep_every_recent_reading_once_within_budget_and_memory(tmp_path: Path) -> None:
    probe = create_memory_cgroup()
    if not isinstance(probe, MemoryCgroup):
        pytest.skip(f"no memory cgroup here: {probe}")
    probe.remove(10)
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--days", "3", "--speed", "1440", "--budget-mb", "8", "--recent-hours", "3",
         "--keep", str(tmp_path / "run"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    (tmp_path / "soak.md").write_text(run.stdout)  # the benchmark's table, kept with the run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    f = json.loads(out.read_text())
    assert f["recent_stored"] == f["recent_expected"] > 0
    assert f["duplicates"] == 0
    assert f["old_segments"] > 0 and f["old_segments_partial"] == 0
    assert f["old_segments_first_regime"] > 0  # replay still reaches the first regime
    assert f["max_store_bytes"] <= 8 * 2**20
    assert f["restarts"] == 2 and f["stop_code"] == 0
    # Idle charge of processes that have seen a day of readings (the first before its SIGKILL,
    # the second before its own) against the first's a day in: no growth beyond 10 MB.
    assert sum(age >= 1.0 for *_, age in f["charges_mb"]) >= 3, f["charges_mb"]
    # Anonymous memory: a restarted process finds the libraries' pages in the page cache and
    # activates them, which the charge (usage less inactive file pages) counts once more.
    assert f["anon_growth_mb"] <= 10.0, f["charges_mb"]
    # And the charge with clean page cache dropped: what the process holds.
    assert f["held_growth_mb"] <= 10.0, f["charges_mb"]
