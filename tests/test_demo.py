"""The demo end to end with short settings: nothing lost, an adapter accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_daemon.demo import memory_text, run_demo


# Half a minute of the whole demo: in the slow suite (CI runs it), the parts have their own tests.
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    summary = run_demo(state_dir=tmp_path / "demo", live=False, timeout_s=240)
    assert summary["readings_lost"] == 0
    assert summary["readings_stored"] == summary["readings_sent"] > 0
    assert summary["malformed_sent"] > 0 and summary["rejected"] >= summary["malformed_sent"]
    assert summary["update_accepted"] is True and summary["adapter_version"] == 1
    assert summary["update_reason"] == "drift detected"
    assert summary["adapter_bytes"] < 100_000
    assert summary["score_after"] < summary["score_before"]
    report = Path(summary["report"])
    assert report.name == "index.html" and report.exists()
    assert len(list(report.parent.glob("*.png"))) >= 3
    # The summary's score after the update is the report's, the same statistic over the same steps.
    page = report.read_text()
    assert f"mean anomaly score while v1 was in use</td><td>{summary['score_after']:.3g} over" in page
    # Memory as the watchdog counts it, not RSS; what the update added over serving.
    assert summary["memory_source"] in ("pss", "cgroup") and summary["serving_mb"] > 0
    assert 0 < summary["update_added_mb"] < summary["update_peak_mb"]
    assert not any("rss" in key for key in summary)


def test_live_panel_shows_memory_as_the_watchdog_counts_it() -> None:
    memory = {"rss_mb": 705.2, "usage_mb": 449.6, "usage_source": "pss", "budget_mb": 2048.0, "level": "normal"}
    assert memory_text(memory) == "450 MB PSS of 2048 MB (normal)"
    assert memory_text({**memory, "usage_source": "cgroup"}) == "450 MB cgroup charge of 2048 MB (normal)"
