"""What the report shows, read from a state directory alone (never the running daemon).

store.db becomes a grid, base/ and adapters/ say what served when, updates/ holds the
update traces; forecasts and drift are replayed by scoring/replay.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from edge_daemon.errors import AdapterError, ModelError, ReportError
from edge_daemon.scoring.replay import MAX_FORECASTS, Forecasts, Switch, compute_forecasts, recompute_drift

if TYPE_CHECKING:
    from edge_daemon.artifacts.adapters import AdapterVersion
    from edge_daemon.artifacts.base import BaseModel
    from edge_daemon.artifacts.traces import UpdateTraceJson
    from edge_daemon.config import Config
    from edge_daemon.drift import DriftEvent
    from edge_daemon.frames import Grid

log = logging.getLogger(__name__)


@dataclass
class ReportData:
    """Everything the figures and the page are drawn from."""

    config: Config
    grid: Grid
    readings: int
    time_range: tuple[float, float] | None
    base: BaseModel | None
    base_problem: str | None
    switches: list[Switch]
    current_version: int | None
    forecasts: Forecasts | None
    drift_events: list[DriftEvent]
    updates: list[UpdateTraceJson]
    notes: list[str] = field(default_factory=list)


def _switch_time(adapter: AdapterVersion) -> float | None:
    """When the adapter started serving, on the data's clock.

    `served_from_ts` (newest reading at commit) is what `training.job` records; older adapters fall
    back to the end of their training data, then to their creation time.
    """
    meta = adapter.meta
    if isinstance(meta.served_from_ts, (int, float)):
        return float(meta.served_from_ts)
    recent = meta.data_range.get("recent")
    if isinstance(recent, list) and len(recent) == 2 and isinstance(recent[1], (int, float)):
        return float(recent[1])
    if isinstance(meta.created_unix, (int, float)):
        return float(meta.created_unix)
    try:
        return datetime.fromisoformat(adapter.created).timestamp()
    except ValueError:
        return None


def read_adapters(config: Config) -> tuple[list[Switch], int | None]:
    """Stored adapters ordered by the time they began serving, and the current version."""
    from edge_daemon.artifacts.adapters import AdapterStore
    from edge_daemon.training.records import resets_drift_baseline

    if not config.adapters_dir.is_dir():  # AdapterStore would create it; a report changes nothing
        return [], None
    adapters = AdapterStore(config.adapters_dir, keep=config.train.keep_versions)
    stored = {adapter.version: adapter for adapter in adapters.list()}
    switches = []
    history = adapters.history()
    if history:
        # The recorded changes (commits, rollbacks, base only), on the data's clock where known.
        for entry in history:
            version = entry.get("version")
            t = float(entry.get("data_ts", entry["ts"]))
            if version is None:
                switches.append(Switch(0, t, None))
            elif version in stored:
                adapter = stored[version]
                routine = entry.get("event") == "commit" and not resets_drift_baseline(adapter.meta.update_cause)
                switches.append(Switch(int(version), t, adapter, resets_drift=not routine))
            else:
                log.info("adapter v%s served from %s but is no longer stored (pruned)", version, t)
    else:
        # Older state dirs: each stored adapter from the time it was committed.
        for adapter in stored.values():
            t = _switch_time(adapter)
            if t is not None:
                switches.append(Switch(adapter.version, t, adapter, resets_drift_baseline(adapter.meta.update_cause)))
    try:
        current = adapters.current_version()
    except AdapterError as exc:
        log.warning("%s", exc)
        current = None
    return sorted(switches, key=lambda s: (s.t, s.version)), current


def collect(config: Config, hours: float | None = None, max_forecasts: int = MAX_FORECASTS) -> ReportData:
    """Read the state directory and recompute everything the report shows."""
    from edge_daemon.artifacts.base import load_base
    from edge_daemon.artifacts.traces import read_update_traces
    from edge_daemon.frames import build_grid
    from edge_daemon.store import ReplayStore

    if not config.store_path.is_file():
        raise ReportError(f"no replay store at {config.store_path}: is device.state_dir in the config right?")
    names = config.channels.names
    with ReplayStore(config.store_path, config.store, names) as store:
        span = store.time_range()
        readings = store.count()
        since = span[1] - hours * 3600.0 if (span is not None and hours is not None) else None
        ts, channel_idx, values = store.read(since, None)
    if span is None or ts.size == 0:
        raise ReportError(f"the replay store {config.store_path} holds no readings of {names}")
    grid = build_grid(ts, channel_idx, values, len(names), config.channels.period_s, config.channels.max_fill_steps)
    del ts, channel_idx, values

    notes: list[str] = []
    try:
        base: BaseModel | None = load_base(config.base_dir, names, config.channels.period_s, config.channels.inputs_only)
        base_problem = None
    except ModelError as exc:
        base, base_problem = None, str(exc)
        notes.append(f"No forecasts or anomaly scores: {exc}.")
    switches, current = read_adapters(config) if base is not None else ([], None)
    forecasts = compute_forecasts(grid, base, switches, max_forecasts) if base is not None else None
    if base is not None and forecasts is None:
        notes.append(f"No forecasts: no gap-free stretch of {base.cfg.window + 1} grid steps in the store.")
    if forecasts is not None and forecasts.stride > 1:
        notes.append(
            f"Forecasts (and the residual drift detectors) use every {forecasts.stride}th step "
            f"to keep the report fast; input drift uses every step."
        )
    events = recompute_drift(config, grid, forecasts, switches, base)
    return ReportData(
        config=config,
        grid=grid,
        readings=readings,
        time_range=span,
        base=base,
        base_problem=base_problem,
        switches=switches,
        current_version=current,
        forecasts=forecasts,
        drift_events=events,
        updates=read_update_traces(config),
        notes=notes,
    )
