"""`edge-daemon report`: pictures of what a device saw and did, made from its state directory alone.

Reads store.db, base/, adapters/ and updates/ (never the running daemon), replays forecasts,
anomaly scores and drift detections through the daemon's own forward and drift feed
(scoring/replay.py), and writes PNG figures (matplotlib, Agg, imported lazily) and one
self-contained index.html that embeds them.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_daemon.errors import AdapterError, ModelError, ReportError
from edge_daemon.scoring.replay import MAX_FORECASTS, Forecasts, Switch, compute_forecasts, recompute_drift

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from edge_daemon.adapters import AdapterVersion, BaseModel
    from edge_daemon.config import Config
    from edge_daemon.drift import DriftEvent
    from edge_daemon.frames import Grid

log = logging.getLogger(__name__)

# Points per plotted line; longer series are thinned for drawing only.
MAX_PLOT_POINTS = 6_000
# Update traces drawn (the newest ones); each gets its own figure.
MAX_UPDATE_FIGURES = 4
DPI = 100


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
    updates: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Reading the state directory
# ---------------------------------------------------------------------------


def _switch_time(adapter: AdapterVersion) -> float | None:
    """When the adapter started serving, on the data's clock.

    `served_from_ts` (newest reading at commit) is what the updater records; older adapters fall
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
    from edge_daemon.adapters import AdapterStore
    from edge_daemon.records import resets_drift_baseline

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


def read_update_traces(config: Config) -> list[dict[str, Any]]:
    """Traces of past updates (`updates/*.json`, plus adapters' `trace.json` not among them), oldest first."""
    from edge_daemon.updater import TRACE_FILE, UPDATES_DIR

    traces: dict[float, dict[str, Any]] = {}
    candidates = sorted((config.device.state_dir / UPDATES_DIR).glob("*.json"))
    if config.adapters_dir.is_dir():
        candidates += sorted(config.adapters_dir.glob(f"v*/{TRACE_FILE}"))
    for path in candidates:
        try:
            trace = json.loads(path.read_text(encoding="utf-8"))
            started = float(trace["started_unix"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable update trace %s: %s", path, exc)
            continue
        traces.setdefault(started, trace)  # the same update in both places: keep one
    return [traces[k] for k in sorted(traces)]


def collect(config: Config, hours: float | None = None, max_forecasts: int = MAX_FORECASTS) -> ReportData:
    """Read the state directory and recompute everything the report shows."""
    from edge_daemon.adapters import load_base
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


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _dates(t: np.ndarray) -> np.ndarray:
    """Unix seconds -> datetime64 (UTC) for matplotlib's date axis."""
    return (np.asarray(t, dtype=np.float64) * 1000.0).astype("datetime64[ms]")


def _thin(n: int, limit: int = MAX_PLOT_POINTS) -> slice:
    return slice(None, None, max(1, math.ceil(n / limit)))


def _new_figure(rows: int, height_per_row: float, width: float = 12.0) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    # Figure without pyplot: no global state, no GUI backend; savefig renders with Agg.
    fig = Figure(figsize=(width, max(2.5, rows * height_per_row)), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _mark_switches(ax: Axes, switches: list[Switch], label: bool) -> None:
    for switch in switches:
        x = _dates(np.array([switch.t]))[0]
        ax.axvline(x, color="tab:green", linestyle="--", linewidth=1.2, label="adapter switch" if label and switch is switches[0] else None)
        if label:
            ax.annotate(f"v{switch.version}" if switch.version else "base", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="tab:green", fontsize=9)  # fmt: skip


def _format_time_axis(ax: Axes) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def plot_channels(data: ReportData, path: Path) -> Path:
    """Each channel over time with the served model's one-step forecasts (and the base's, once adapters
    serve); an input-only channel has no forecast."""
    names = data.config.channels.names
    forecast = data.config.channels.forecast
    grid = data.grid
    fig, axes = _new_figure(len(names), 2.4)
    thin = _thin(len(grid.values))
    t_grid = _dates(grid.t0 + np.arange(len(grid.values))[thin] * grid.period_s)
    fc = data.forecasts
    for c, ax in enumerate(axes):
        ax.plot(t_grid, grid.values[thin, c], color="0.35", linewidth=0.8, label="reading")
        if fc is not None and data.base is not None and names[c] in forecast:
            column = forecast.index(names[c])  # forecasts are in the model's output order
            f_thin = _thin(len(fc.t))
            t_fc = _dates(fc.t[f_thin])
            served = data.base.norm.invert(fc.served[f_thin])[:, column]
            if data.switches and (fc.served_version > 0).any():
                base = data.base.norm.invert(fc.base[f_thin])[:, column]
                adapted = fc.served_version[f_thin] > 0
                ax.plot(t_fc, np.where(adapted, base, np.nan), color="tab:orange", linewidth=0.8, alpha=0.8,
                        label="base model (not served)")  # fmt: skip
            ax.plot(t_fc, served, color="tab:blue", linewidth=0.8, alpha=0.85, label="forecast (served model)")
        _mark_switches(ax, data.switches, label=c == 0)
        ax.set_ylabel(names[c], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8, ncols=4)
    axes[0].set_title("Sensor channels and one-step forecasts")
    _format_time_axis(axes[-1])
    return _save(fig, path)


def _rolling_mean(x: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(x) < n:
        return x
    kernel = np.ones(n) / n
    padded = np.concatenate([np.full(n - 1, x[0]), x])
    return np.convolve(padded, kernel, mode="valid")


def plot_anomaly(data: ReportData, path: Path) -> Path:
    """Anomaly score over time (served model, and the base for comparison) against the alert threshold."""
    fc = data.forecasts
    assert fc is not None
    fig, (ax,) = _new_figure(1, 3.6)
    thin = _thin(len(fc.t))
    t = _dates(fc.t[thin])
    smooth = max(1, len(fc.t) // 200)
    if (fc.served_version > 0).any():
        ax.plot(t, _rolling_mean(fc.base_score, smooth)[thin], color="tab:orange", linewidth=1.0,
                label=f"base model (mean of {smooth} steps)")  # fmt: skip
    ax.plot(t, fc.served_score[thin], color="tab:blue", linewidth=0.5, alpha=0.35, label="served model, per step")
    ax.plot(t, _rolling_mean(fc.served_score, smooth)[thin], color="tab:blue", linewidth=1.4,
            label=f"served model (mean of {smooth} steps)")  # fmt: skip
    threshold = data.config.outputs.anomaly_threshold
    ax.axhline(threshold, color="tab:red", linestyle=":", label=f"alert threshold {threshold:g}")
    ax.axhline(1.0, color="0.5", linestyle=":", linewidth=0.8)
    _mark_switches(ax, data.switches, label=True)
    ax.set_yscale("log")
    ax.set_ylabel("anomaly score (~1 normal)")
    ax.set_title("Anomaly score: RMS of forecast residuals over their typical size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    _format_time_axis(ax)
    return _save(fig, path)


def plot_drift(data: ReportData, path: Path) -> Path:
    """Drift detections per forecast channel (inputs and residuals) and adapter switches on one time axis."""
    names = data.config.channels.forecast
    fc = data.forecasts
    fig, axes = _new_figure(2 if fc is not None else 1, 2.8)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    if fc is not None:
        ax = axes[0]
        thin = _thin(len(fc.t))
        scale = data.base.residual_scale if data.base is not None else np.ones(len(names))
        magnitude = np.abs(fc.served - fc.actual) / scale  # (M, C), ~1 normal
        smooth = max(5, len(fc.t) // 150)
        for c, name in enumerate(names):
            ax.plot(_dates(fc.t[thin]), _rolling_mean(magnitude[:, c], smooth)[thin], color=colors[c % len(colors)],
                    linewidth=1.0, label=name)  # fmt: skip
        ax.axhline(1.0, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_ylabel(f"|residual| / typical\n(mean of {smooth} steps)", fontsize=9)
        ax.set_title("Residuals of the served model and drift detections (recomputed)")
        ax.grid(alpha=0.3)
        _mark_switches(ax, data.switches, label=True)
        ax.legend(loc="upper left", fontsize=8, ncols=len(names))
    ax = axes[-1]
    for kind, marker, size, offset in (("inputs", "|", 120, -0.15), ("residuals", "v", 40, 0.15)):
        for c, name in enumerate(names):
            times = [e.t for e in data.drift_events if e.channel == name and e.kind == kind]
            if times:
                ax.scatter(_dates(np.array(times)), np.full(len(times), c + offset), marker=marker, s=size,
                           color=colors[c % len(colors)], alpha=0.9,
                           label=f"{kind} drift" if c == 0 else None)  # fmt: skip
    # Invisible anchors keep the time span of the other figures even without detections.
    ax.plot(_dates(np.array([data.grid.t0, data.grid.t0 + max(0, len(data.grid.values) - 1) * data.grid.period_s])),
            [0, 0], alpha=0)  # fmt: skip
    _mark_switches(ax, data.switches, label=fc is None)
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_ylim(-0.6, len(names) - 0.4)
    counts = {kind: sum(e.kind == kind for e in data.drift_events) for kind in ("inputs", "residuals")}
    ax.set_title(f"Detections ({data.config.drift.detector}): | inputs ({counts['inputs']}), v residuals ({counts['residuals']})",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3, axis="x")
    _format_time_axis(ax)
    return _save(fig, path)


def _plan_label(plan: dict[str, Any]) -> str:
    return (
        f"{plan.get('micro_batch')}x{plan.get('accumulation')} "
        f"{'ckpt' if plan.get('checkpointing') else 'no-ckpt'} {plan.get('optimizer')}"
    )


def plot_update(trace: dict[str, Any], path: Path) -> Path:
    """Memory of one update over time, with its phases, plan changes and training loss."""
    fig, (ax_mem, ax_loss) = _new_figure(2, 3.0, width=11.0)
    samples = trace.get("samples") or {}
    t = np.asarray(samples.get("t") or [], dtype=np.float64)
    rss = np.asarray([np.nan if v is None else v for v in samples.get("rss_mb") or []], dtype=np.float64)
    service = np.asarray([np.nan if v is None else v for v in samples.get("service_mb") or []], dtype=np.float64)
    private = np.asarray([np.nan if v is None else v for v in samples.get("private_mb") or []], dtype=np.float64)
    ax_mem.plot(t, rss, color="tab:blue", linewidth=1.3, label="update process RSS")
    if private.size == t.size and np.isfinite(private).any():
        ax_mem.plot(t, private, color="tab:cyan", linewidth=1.1, label="update process private (its own pages)")
    if service.size and np.isfinite(service).any():
        ax_mem.plot(t, service, color="tab:purple", linewidth=1.3, label="service (daemon + update, as the watchdog counts it)")
        budget = trace.get("budget_mb")
        top = float(np.nanmax(service))
        if isinstance(budget, (int, float)) and budget > 0:
            off_scale = []
            for name, style in (("elevated", ":"), ("high", "-."), ("critical", "--")):
                share = (trace.get("thresholds") or {}).get(name)
                if not isinstance(share, (int, float)):
                    continue
                # A budget far above what was used (the whole RAM of a big machine) would flatten
                # the curves to the floor: such levels are named, not drawn.
                if share * budget <= 1.5 * top:
                    ax_mem.axhline(share * budget, color="tab:red", linestyle=style, linewidth=0.9,
                                   label=f"{name} ({share:.0%} of {budget:.0f} MB)")  # fmt: skip
                else:
                    off_scale.append(f"{name} {share * budget:.0f} MB")
            if off_scale:
                ax_mem.plot([], [], " ", label=f"budget {budget:.0f} MB; off scale: {', '.join(off_scale)}")
    # Phases as shaded spans, named where they are wide enough to read.
    phases = trace.get("phases") or []
    end = float(trace.get("duration_s") or (t[-1] if t.size else 0.0))
    for i, phase in enumerate(phases):
        lo = float(phase["t"])
        hi = float(phases[i + 1]["t"]) if i + 1 < len(phases) else end
        for ax in (ax_mem, ax_loss):
            ax.axvspan(lo, hi, color="0.93" if i % 2 else "0.86", zorder=0, linewidth=0)
        if end > 0 and (hi - lo) / end > 0.06:
            ax_loss.annotate(phase["phase"], ((lo + hi) / 2, 0.96), xycoords=("data", "axes fraction"), ha="center",
                             va="top", fontsize=8, color="0.3")  # fmt: skip
    for i, change in enumerate(trace.get("plans") or []):
        for ax in (ax_mem, ax_loss):
            ax.axvline(change["t"], color="tab:orange", linewidth=1.2, linestyle="--")
        level = f" ({change['level']})" if change.get("level") else ""
        ax_mem.annotate(("plan " if i == 0 else "-> ") + _plan_label(change["plan"]) + level, (change["t"], 0.97),
                        xycoords=("data", "axes fraction"), fontsize=8, color="tab:orange", va="top",
                        xytext=(3, -12 * (i % 4)), textcoords="offset points")  # fmt: skip
    ax_mem.set_ylabel("RSS (MB)")
    ax_mem.grid(alpha=0.3)
    ax_mem.legend(loc="best", fontsize=8)
    steps = trace.get("steps") or {}
    if steps.get("t"):
        ax_loss.plot(steps["t"], steps["loss"], color="tab:blue", marker=".", markersize=3, linewidth=1.0)
    else:
        ax_loss.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("training loss (batch MAE)")
    ax_loss.set_xlabel("seconds since the update started")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_xlim(left=0.0, right=max(end, 1e-3) * 1.01)
    started = datetime.fromtimestamp(float(trace.get("started_unix", 0.0)), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    outcome = trace.get("outcome", "?")
    version = f" v{trace['version']}" if trace.get("version") else ""
    ax_mem.set_title(f"Update at {started}: {outcome}{version} ({trace.get('reason') or 'no reason recorded'})")
    return _save(fig, path)


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------


def _iso(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: ReportData, figures: list[tuple[str, Path]], elapsed_s: float) -> str:
    """The report page: summary tables and every figure embedded as a base64 PNG."""
    config = data.config
    grid = data.grid
    span = data.time_range
    fc = data.forecasts
    summary_rows = [
        ["device", html.escape(config.device.id)],
        ["state directory", html.escape(str(config.device.state_dir))],
        ["readings in the store", f"{data.readings:,}"],
        ["time range", f"{_iso(span[0])} to {_iso(span[1])}" if span else "-"],
        ["channels", html.escape(", ".join(config.channels.forecast))],
        *([["inputs only (not forecast)", html.escape(", ".join(config.channels.inputs_only))]] if config.channels.inputs_only else []),
        ["grid steps shown", f"{len(grid.values):,} at {grid.period_s:g} s"],
        ["base model", html.escape(data.base_problem) if data.base is None else
         f"window {data.base.cfg.window}, {data.base.model.n_params():,} parameters, "
         f"validation loss {_num(data.base.meta.get('val_loss'))}"],  # fmt: skip
        ["adapter served now", f"v{data.current_version}" if data.current_version else "none (base model)"],
        ["drift detections (recomputed)", f"{sum(e.kind == 'inputs' for e in data.drift_events)} on inputs, "
         f"{sum(e.kind == 'residuals' for e in data.drift_events)} on residuals ({html.escape(config.drift.detector)})"],  # fmt: skip
    ]
    if fc is not None:
        for version in sorted(set(fc.served_version.tolist())):
            mask = fc.served_version == version
            name = f"v{version}" if version else "base model"
            summary_rows.append([f"mean anomaly score while {name} served",
                                 f"{float(np.mean(fc.served_score[mask])):.3g} over {int(mask.sum()):,} steps"])  # fmt: skip
    adapter_rows = []
    listed: set[int] = set()
    for switch in data.switches:
        # One row per adapter, from when it first served; rollbacks show in the figures.
        if switch.adapter is None or switch.version in listed:
            continue
        listed.add(switch.version)
        meta = switch.adapter.meta
        before, after = meta.metrics_before, meta.metrics_after
        adapter_rows.append(
            [
                f"v{switch.version}" + (" (current)" if switch.version == data.current_version else ""),
                html.escape(switch.adapter.created),
                _iso(switch.t),
                f"{switch.adapter.size_bytes:,}",
                f"{_num(before.get('recent_val_loss'))} &rarr; {_num(after.get('recent_val_loss'))}",
                f"{_num(before.get('replay_val_loss'))} &rarr; {_num(after.get('replay_val_loss'))}",
                _num(meta.peak_rss_mb),
                html.escape(_plan_label(meta.plan)) if isinstance(meta.plan, dict) else "-",
                html.escape(str(meta.reason or "-")),
            ]
        )
    # The yardstick: one-step MAE of the model and each baseline on the held-out windows of the
    # base's training and of each adapter's update, and who serves first after it.
    yardstick_rows = []
    held_out_sources = [("base model", data.base.meta.get("held_out"))] if data.base is not None else []
    held_out_sources += [(f"v{s.version}", s.adapter.meta.held_out) for s in data.switches if s.adapter is not None]
    seen: set[str] = set()
    for name, held_out in held_out_sources:
        if name in seen or not isinstance(held_out, dict):
            continue
        seen.add(name)
        mae = held_out.get("mae") or {}
        yardstick_rows.append([name, html.escape(str(held_out.get("serve", "-"))), f"{held_out.get('windows', 0):,}",
                               ", ".join(f"{html.escape(k)} {_num(v)}" for k, v in mae.items()) or "-"])  # fmt: skip
    update_rows = []
    for trace in data.updates:
        peak = trace.get("peak_sampled_rss_mb")
        update_rows.append(
            [
                _iso(trace.get("started_unix")),
                html.escape(str(trace.get("outcome", "?"))) + (f" v{trace['version']}" if trace.get("version") else ""),
                html.escape(str(trace.get("reason") or "-")),
                _num(trace.get("duration_s"), 3),
                _num(peak),
                " &rarr; ".join(html.escape(_plan_label(p["plan"])) for p in trace.get("plans") or []) or "-",
                html.escape(str(trace.get("detail") or "-")),
            ]
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>edge-daemon report: {html.escape(config.device.id)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1240px;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;font-size:14px}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"
        "figure{margin:1em 0 2em}figcaption{color:#555;font-size:14px}</style></head><body>",
        f"<h1>edge-daemon report: {html.escape(config.device.id)}</h1>",
        f"<p>Made {_iso(time.time())} from the state directory alone in {elapsed_s:.1f} s. Forecasts, anomaly "
        "scores and drift detections are recomputed by replaying the store through the base model and each "
        "stored adapter from the time it began serving (the newest reading when it was committed).</p>",
        "<h2>Summary</h2>",
        _table(["what", "value"], summary_rows),
        "<h2>Adapters</h2>",
        _table(["version", "created", "serving from (data time)", "size (bytes)", "recent val loss before &rarr; after",
                "replayed val loss before &rarr; after", "peak RSS (MB)", "start plan", "reason"], adapter_rows)
        if adapter_rows else "<p>No adapters stored: the base model serves.</p>",  # fmt: skip
        "<h2>Against the baselines</h2>",
        _table(["trained", "serves first", "held-out windows", "one-step MAE (normalised)"], yardstick_rows)
        if yardstick_rows else "<p>No held-out comparison recorded.</p>",  # fmt: skip
        "<p>While serving, the daemon keeps comparing the model with persistence, seasonal naive and the ridge "
        "autoregression on every scored step and serves whichever has the lowest mean |error| "
        "(<code>[outputs] serve</code>); <code>edge-daemon status</code> shows the live figures.</p>",
        "<h2>Updates</h2>",
        _table(["started", "outcome", "reason", "duration (s)", "peak RSS (MB)", "plans", "detail"], update_rows)
        if update_rows else "<p>No update traces recorded.</p>",  # fmt: skip
    ]
    if data.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>")
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<figure><img alt='{html.escape(path.name)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(config: Config, out_dir: Path, *, hours: float | None = None, max_forecasts: int = MAX_FORECASTS) -> list[Path]:
    """Write the figures (PNG) and index.html for the state directory of `config` into `out_dir`.

    `hours` limits the readings to the newest H hours of the store. Returns the files written,
    index.html last. ReportError if the state directory has no replay store or it is empty.
    """
    started = time.monotonic()
    data = collect(config, hours=hours, max_forecasts=max_forecasts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = [
        ("Sensor channels with the served model's one-step forecasts; dashed green lines: adapter switches",
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


__all__ = ["MAX_FORECASTS", "ReportData", "collect", "compute_forecasts", "read_update_traces", "recompute_drift", "write_report"]
