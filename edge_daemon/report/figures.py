"""The report's PNG figures (matplotlib, Agg backend, imported only when drawing)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from edge_daemon.artifacts.traces import UpdateTraceJson
    from edge_daemon.control.replies import PlanStatus

    from edge_daemon.config import DriftConfig
    from edge_daemon.report.data import ReportData
    from edge_daemon.scoring.replay import Switch

# Points per plotted line; longer series are thinned for drawing only.
MAX_PLOT_POINTS = 6_000
DPI = 100


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


# What the forecasts drawn are: the model's, as the replay makes them (scoring/replay.py); the
# daemon may have published a baseline's instead where one forecast better.
MODEL_IN_USE = "model in use (base, or the adapter from its switch)"


def plot_channels(data: ReportData, path: Path) -> Path:
    return _save(channels_figure(data), path)


def channels_figure(data: ReportData) -> Figure:
    """Each channel over time with the one-step forecasts of the model in use, drawn as a dashed line
    over the readings, and below it their error (forecast - reading), where a forecast drawn on
    top of the readings would hide it; the base's too once an adapter is in use. An input-only
    channel has no forecast and no error panel."""
    from matplotlib.figure import Figure

    names = data.config.channels.names
    forecast = data.config.channels.forecast
    grid = data.grid
    fc = data.forecasts
    with_error = [fc is not None and data.base is not None and name in forecast for name in names]
    ratios = [r for has_error in with_error for r in ((3, 1.4) if has_error else (3,))]
    fig = Figure(figsize=(12.0, max(2.5, 0.8 * sum(ratios))), layout="constrained")
    all_axes = list(fig.subplots(len(ratios), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0])
    thin = _thin(len(grid.values))
    t_grid = _dates(grid.t0 + np.arange(len(grid.values))[thin] * grid.period_s)
    row = 0
    for c, name in enumerate(names):
        ax = all_axes[row]
        row += 1
        ax.plot(t_grid, grid.values[thin, c], color="0.25", linewidth=0.9, label="reading")
        if with_error[c]:
            assert fc is not None and data.base is not None
            err_ax = all_axes[row]
            row += 1
            column = forecast.index(name)  # forecasts are in the model's output order
            f_thin = _thin(len(fc.t))
            t_fc = _dates(fc.t[f_thin])
            actual = data.base.norm.invert(fc.actual[f_thin])[:, column]
            served = data.base.norm.invert(fc.served[f_thin])[:, column]
            if data.switches and (fc.served_version > 0).any():
                base = data.base.norm.invert(fc.base[f_thin])[:, column]
                base_only = np.where(fc.served_version[f_thin] > 0, base, np.nan)
                ax.plot(t_fc, base_only, color="tab:orange", linewidth=0.8, linestyle=(0, (2, 2)), alpha=0.9,
                        label="forecast of the base alone")  # fmt: skip
                err_ax.plot(t_fc, base_only - actual, color="tab:orange", linewidth=0.7, alpha=0.8)
            ax.plot(t_fc, served, color="tab:blue", linewidth=0.8, linestyle=(0, (4, 2)), alpha=0.9,
                    label=f"forecast of the {MODEL_IN_USE}")  # fmt: skip
            err_ax.plot(t_fc, served - actual, color="tab:blue", linewidth=0.7, alpha=0.8)
            err_ax.axhline(0.0, color="0.3", linewidth=0.8)
            err_ax.set_ylabel("error", fontsize=8)
            err_ax.grid(alpha=0.3)
            _mark_switches(err_ax, data.switches, label=False)
        _mark_switches(ax, data.switches, label=c == 0)
        ax.set_ylabel(name, fontsize=9)
        ax.grid(alpha=0.3)
    legend: dict[str, Artist] = {}  # label -> its first handle
    for ax in all_axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    # Below the axes, never over the lines.
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle("Sensor channels, one-step forecasts and their error (forecast - reading)")
    _format_time_axis(all_axes[-1])
    return fig


def _rolling_mean(x: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(x) < n:
        return x
    kernel = np.ones(n) / n
    padded = np.concatenate([np.full(n - 1, x[0]), x])
    return np.convolve(padded, kernel, mode="valid")


def plot_anomaly(data: ReportData, path: Path) -> Path:
    """Anomaly score over time (model in use, and the base alone for comparison) against the alert threshold."""
    fc = data.forecasts
    assert fc is not None
    fig, (ax,) = _new_figure(1, 3.6)
    thin = _thin(len(fc.t))
    t = _dates(fc.t[thin])
    smooth = max(1, len(fc.t) // 200)
    if (fc.served_version > 0).any():
        ax.plot(t, _rolling_mean(fc.base_score, smooth)[thin], color="tab:orange", linewidth=1.0,
                label=f"base alone (mean of {smooth} steps)")  # fmt: skip
    ax.plot(t, fc.served_score[thin], color="tab:blue", linewidth=0.5, alpha=0.35, label="model in use, per step")
    ax.plot(t, _rolling_mean(fc.served_score, smooth)[thin], color="tab:blue", linewidth=1.4,
            label=f"model in use (mean of {smooth} steps)")  # fmt: skip
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
        ax.set_title("Residuals of the model in use and drift detections (recomputed)")
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
    judges = drift_judges(data.config.drift)
    ax.set_title(f"Detections: | inputs ({counts['inputs']}): {judges['inputs']}\n"
                 f"v residuals ({counts['residuals']}): {judges['residuals']}", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3, axis="x")
    _format_time_axis(ax)
    return _save(fig, path)


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}-{unit}"
    return f"{seconds:g}-s"


def drift_judges(cfg: DriftConfig) -> dict[str, str]:
    """What judges drift on the inputs and on the residuals with these settings (drift/channel.py)."""
    if cfg.inputs == "reference":
        inputs = f"PSI of a {_span(cfg.input_window_s)} window against the training data"
    else:
        inputs = f"{cfg.detector} on every value"
    if cfg.residuals == "window":
        residuals = f"mean |residual| of a {_span(cfg.residual_window_s)} window against its baseline"
        if cfg.cusum:
            residuals += ", and a CUSUM"
    else:
        residuals = f"{cfg.detector} on every residual"
    return {"inputs": inputs, "residuals": residuals}


def plan_label(plan: PlanStatus) -> str:
    return (
        f"{plan.get('micro_batch')}x{plan.get('accumulation')} "
        f"{'ckpt' if plan.get('checkpointing') else 'no-ckpt'} {plan.get('optimizer')}"
    )


def plot_update(trace: UpdateTraceJson, path: Path) -> Path:
    return _save(update_figure(trace), path)


def update_figure(trace: UpdateTraceJson) -> Figure:
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
        ax_mem.annotate(("plan " if i == 0 else "-> ") + plan_label(change["plan"]) + level, (change["t"], 0.97),
                        xycoords=("data", "axes fraction"), fontsize=8, color="tab:orange", va="top",
                        xytext=(3, -12 * (i % 4)), textcoords="offset points")  # fmt: skip
    ax_mem.set_ylabel("memory (MB)")
    ax_mem.grid(alpha=0.3)
    # Beside the axes, never over the lines.
    ax_mem.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    steps = trace.get("steps") or {}
    if steps.get("t"):
        ax_loss.plot(steps["t"], steps["loss"], color="tab:blue", marker=".", markersize=3, linewidth=1.0)
    else:
        ax_loss.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("training loss (batch MAE)")
    ax_loss.set_xlabel("seconds since the update started")
    ax_loss.grid(alpha=0.3)
    # The whole update: to its end, or its last sample, step or event if one came later.
    last = max([end, *(t[-1:] if t.size else []), *(steps.get("t") or [])[-1:], *(float(p["t"]) for p in phases),
                *(float(c["t"]) for c in trace.get("plans") or [])])  # fmt: skip
    ax_loss.set_xlim(left=0.0, right=max(last, 1.0) * 1.02)
    started = datetime.fromtimestamp(float(trace.get("started_unix", 0.0)), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    outcome = trace.get("outcome", "?")
    version = f" v{trace['version']}" if trace.get("version") else ""
    ax_mem.set_title(f"Update at {started}: {outcome}{version} ({trace.get('reason') or 'no reason recorded'})")
    return fig
