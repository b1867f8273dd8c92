"""The demo end to end with short settings: nothing lost, an adapter accepted."""

from __future__ import annotations

from pathlib import Path

from edge_daemon.demo import run_demo


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
