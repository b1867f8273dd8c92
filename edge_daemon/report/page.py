"""The report's one self-contained index.html, with the figures embedded."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_daemon.report.data import ReportData
from edge_daemon.report.figures import MODEL_IN_USE, drift_judges, plan_label
from edge_daemon.times import iso


def _iso(t: float | None) -> str:
    """`times.iso`, with the shorter Z for UTC that a page reader expects."""
    return "-" if t is None else str(iso(t)).replace("+00:00", "Z")


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
    judges = drift_judges(config.drift)
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
        ["adapter in use now", f"v{data.current_version}" if data.current_version else "none (base model)"],
        ["drift detections (recomputed)", f"{sum(e.kind == 'inputs' for e in data.drift_events)} on inputs "
         f"({html.escape(judges['inputs'])}), {sum(e.kind == 'residuals' for e in data.drift_events)} on residuals "
         f"({html.escape(judges['residuals'])})"],  # fmt: skip
    ]
    if fc is not None:
        for version in sorted(set(fc.served_version.tolist())):
            mask = fc.served_version == version
            name = f"v{version}" if version else "the base model alone"
            summary_rows.append([f"mean anomaly score while {name} was in use",
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
                html.escape(plan_label(meta.plan)) if isinstance(meta.plan, dict) else "-",
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
                " &rarr; ".join(html.escape(plan_label(p["plan"])) for p in trace.get("plans") or []) or "-",
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
        _table(["trained", "served first (by held-out MAE)", "held-out windows", "one-step MAE (normalised)"], yardstick_rows)
        if yardstick_rows else "<p>No held-out comparison recorded.</p>",  # fmt: skip
        "<p>While serving, the daemon keeps comparing the model with persistence, seasonal naive and the ridge "
        "autoregression on every scored step and serves whichever has the lowest mean |error| "
        "(<code>[outputs] serve</code>); <code>edge-daemon status</code> shows the live figures. That choice is not "
        f"replayed here: the figures' forecasts and anomaly scores are those of the {html.escape(MODEL_IN_USE)}, "
        "which the daemon published wherever no baseline forecast better.</p>",
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
