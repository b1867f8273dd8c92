"""`edge-daemon report`: pictures of what a device saw and did, made from its state directory alone.

data.py reads store.db, base/, adapters/ and updates/ (never the running daemon) and replays
forecasts, anomaly scores and drift through the daemon's own forward and drift feed
(scoring/replay.py); figures.py draws the PNG figures; page.py writes one self-contained
index.html that embeds them. Nothing here is on the daemon's import path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_daemon.report.data import ReportData, collect
from edge_daemon.report.figures import plot_anomaly, plot_channels, plot_drift, plot_update
from edge_daemon.report.page import render_html
from edge_daemon.scoring.replay import MAX_FORECASTS

if TYPE_CHECKING:
    from edge_daemon.config import Config

log = logging.getLogger(__name__)

# Update traces drawn (the newest ones); each gets its own figure.
MAX_UPDATE_FIGURES = 4


def write_report(
    config: Config, out_dir: Path, *, hours: float | None = None, max_forecasts: int = MAX_FORECASTS, data: ReportData | None = None
) -> list[Path]:
    """Write the figures (PNG) and index.html for the state directory of `config` into `out_dir`.

    `hours` limits the readings to the newest H hours of the store; `data`, when given, is what
    `collect` already read (and `hours`, `max_forecasts` are not used). Returns the files written,
    index.html last. ReportError if the state directory has no replay store or it is empty.
    """
    started = time.monotonic()
    if data is None:
        data = collect(config, hours=hours, max_forecasts=max_forecasts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = [
        ("Sensor channels with the one-step forecasts of the model in use (the base, or the adapter from its switch) "
         "and their error; dashed green lines: adapter switches",
         plot_channels(data, out_dir / "channels.png")),  # fmt: skip
    ]
    if data.forecasts is not None:
        figures.append(("Anomaly score over time against the alert threshold", plot_anomaly(data, out_dir / "anomaly.png")))
    figures.append(("Drift detections recomputed with the daemon's drift settings, and adapter switches",
                    plot_drift(data, out_dir / "drift.png")))  # fmt: skip
    for trace in data.updates[-MAX_UPDATE_FIGURES:]:
        stamp = int(float(trace.get("started_unix", 0.0)) * 1000)
        figures.append(("Memory and training plan over one update", plot_update(trace, out_dir / f"update-{stamp}.png")))
    elapsed = time.monotonic() - started
    index = out_dir / "index.html"
    index.write_text(render_html(data, figures, elapsed), encoding="utf-8")
    files = [path for _, path in figures] + [index]
    log.info("report of %d readings written to %s in %.1f s", data.readings, out_dir, time.monotonic() - started)
    return files
