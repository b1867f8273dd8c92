"""Human output of the client commands: value formatting and the rich rendering of each reply.

Replies are read by their keys (control/replies.py); `.get` only for what may be absent. A few keys the
daemon always sends are read with `.get` too, marked "older daemon": replies without them (from
a daemon of an earlier version, or the tests' partial replies) still render. Values keep being
formatted defensively (`fmt_*`). rich is imported only when rendering.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from edge_daemon.cli.exits import EXIT_ERROR, EXIT_OK
from edge_daemon.control.replies import (
    AdapterReply,
    AdaptersReply,
    AdapterSummary,
    DriftReply,
    DriftStatus,
    IngestStatus,
    LastUpdate,
    MemoryStatus,
    PlanStatus,
    PsiStatus,
    ResidualWindowStatus,
    RollbackReply,
    ScoringStatus,
    StatusReply,
    StoreStatus,
    TrainReply,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def key_value_table() -> Table:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


# -- formatting of values that may be missing or of the wrong type ----------------------------

NONE = "-"


def esc(value: Any) -> str:
    """Text from the daemon, safe to embed in rich markup (a channel named "[red]" stays literal)."""
    from rich.markup import escape

    return escape(str(value))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def fmt_int(value: Any) -> str:
    number = _number(value)
    return NONE if number is None else f"{int(number):,}"


def fmt_float(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return NONE if number is None else f"{number:.{digits}g}"


def fmt_bytes(value: Any) -> str:
    number = _number(value)
    if number is None:
        return NONE
    for unit in ("B", "kB", "MB", "GB"):
        if abs(number) < 1000 or unit == "GB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    return NONE  # unreachable


def fmt_mb(value: Any) -> str:
    number = _number(value)
    return NONE if number is None else f"{number:,.0f} MB"


def fmt_duration(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return NONE
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def fmt_time(value: Any) -> str:
    """An iso8601 string as `YYYY-MM-DD HH:MM:SS` (+zone); anything else as given."""
    if not value:
        return NONE
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return esc(value)
    zone = "" if moment.utcoffset() is None else ("Z" if not moment.utcoffset() else moment.strftime("%z"))
    return moment.strftime("%Y-%m-%d %H:%M:%S") + zone


def fmt_change(before: Any, after: Any) -> str:
    if _number(before) is None and _number(after) is None:
        return NONE
    return f"{fmt_float(before)} -> {fmt_float(after)}"


def fmt_other(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return esc(text if len(text) <= limit else text[: limit - 3] + "...")


def section(reply: StatusReply, key: str) -> Any:
    """A section of `status`, None when the daemon sent none (its part has not started) or no object."""
    value = reply.get(key)
    return value if isinstance(value, dict) else None


LEVEL_STYLE = {"normal": "green", "elevated": "yellow", "high": "red", "critical": "bold red"}


# -- one-line summaries of the status sections ----------------------------------------------------


def describe_store(store: StoreStatus) -> str:
    text = f"{fmt_int(store['readings'])} readings, {fmt_bytes(store.get('bytes'))}"  # older daemon
    check = store.get("check")  # older daemon: none
    if check and check.get("moved_to"):
        cause = check.get("cause", "start")  # older daemon: checked at start only
        when = {"start": "at start", "scheduled": "at its scheduled check"}.get(cause, f"after {cause}")
        text += f"; damaged {when} ({check.get('problem')}): moved aside to {check['moved_to']}"
    if store.get("damaged", 0) > 1:
        text += f" ({store['damaged']} damaged stores since start)"
    return text


INGEST_COUNTS = (
    ("received", "messages received"),
    ("stored", "readings stored"),
    ("duplicates", "duplicate readings"),
    ("rejected", "rejected"),
)


def describe_ingest(ingest: IngestStatus) -> str:
    parts = []
    broker = ingest.get("broker")  # older daemon: none
    if broker is not None:
        over = " over TLS" if broker["tls"] else ""
        if broker["connected"]:
            parts.append(f"connected{over}")
        else:
            parts.append(f"[red]DISCONNECTED[/red]{over}" + (f" ({esc(broker['error'])})" if broker["error"] else ""))
    elif "connected" in ingest:  # older daemon
        parts.append("connected" if ingest["connected"] else "[red]DISCONNECTED[/red]")
    # What each count counts: `received` messages, `stored` and `duplicates` readings (a message
    # may carry several readings), `rejected` messages and rejected entries. `duplicates`: older daemon.
    counts = [f"{fmt_int(ingest[k])} {what}" for k, what in INGEST_COUNTS if k in ingest]  # type: ignore[literal-required]
    text = "; ".join(parts + [", ".join(counts)] if counts else parts) or NONE
    by_reason = ingest["rejected_by_reason"]
    if by_reason:
        text += " (" + ", ".join(f"{esc(k)} {fmt_int(v)}" for k, v in sorted(by_reason.items())) + ")"
    ignored = ingest.get("ignored_by_reason")  # older daemon
    if ignored:
        text += "; ignored " + ", ".join(f"{esc(k)} {fmt_int(v)}" for k, v in sorted(ignored.items()))
    clock = ingest.get("clock")  # older daemon
    if clock is not None and (clock["trusted"] is False or clock["holding"]):
        text += f"; [yellow]clock not trusted[/yellow], {fmt_int(clock['holding'])} readings held"
    return text


NO_BASE = "no base model yet (baselines served until one is trained from the store)"


def describe_adapter(adapter: AdapterSummary) -> str:
    version = adapter["version"]
    if version is None:
        return NO_BASE if adapter.get("base") is False else "base model only (no adapter yet)"  # older daemon
    details = [f"created {fmt_time(adapter['created'])}", fmt_bytes(adapter["size_bytes"])]
    if adapter["val_loss"] is not None:
        details.append(f"val_loss {fmt_float(adapter['val_loss'])}")
    return f"v{esc(version)} (" + ", ".join(details) + ")"


def drifted_channels(drift: DriftStatus) -> list[str]:
    return [name for name, channel in drift["channels"].items() if channel["state"] == "drift"]


def describe_drift(drift: DriftStatus) -> str:
    drifted = drifted_channels(drift)
    count = len(drift["channels"])
    if drift["detected"] or drifted:
        text = "[red]DETECTED[/red]" + (" on " + ", ".join(esc(name) for name in drifted) if drifted else "")
    else:
        text = f"none ({count} channels watched)" if count else "none"
    if drift["last_detected"]:
        text += f"; last detection {fmt_time(drift['last_detected'])}"
    return text


def describe_scoring(scoring: ScoringStatus) -> str:
    text = f"{scoring['scored']:,} steps scored, {scoring['anomalies']:,} anomalies"
    # Readings scoring could not use, only when there are some (`late_readings`..: older daemon).
    late, outliers, held = scoring.get("late_readings"), scoring.get("outliers"), scoring.get("held")
    if late:
        last = scoring.get("last_late")
        text += f", {fmt_int(late)} late readings" + (f" (latest stamped {fmt_time(last)})" if last else "")
    if outliers:
        text += f", {fmt_int(outliers)} outliers set aside"
    if held:
        text += f", {fmt_int(held)} held for the clock"
    if scoring.get("stalled"):
        text += f"; [red]{esc(scoring['stalled'])}[/red]"
    serving = scoring["serving"]
    if serving is not None:
        served = serving["served"]
        if served == "mixed":
            served = ", ".join(f"{name} for {channel}" for channel, name in serving["served_by_channel"].items())
        text += f"; serving [bold]{esc(served)}[/bold]"
        if serving.get("baselines_only"):  # an older daemon does not send it
            text += " (no base model yet: baselines fitted on the store)"
        if serving["steps_compared"]:
            errors = ", ".join(f"{esc(name)} {fmt_float(value)}" for name, value in serving["mae"].items() if value is not None)
            text += f" (mean |error| {errors} over {serving['steps_compared']:,} steps)"
    return text


def describe_memory(memory: MemoryStatus) -> str:
    level = str(memory["level"])
    style = LEVEL_STYLE.get(level, "")
    shown_level = f"[{style}]{level}[/{style}]" if style else esc(level)
    # Usage as the kernel counts it (the cgroup's charge or PSS), the measure the level is judged
    # by; an older daemon sends only the tree's RSS, which counts shared pages once per process.
    usage = _number(memory.get("usage_mb"))
    if usage is not None:
        text = f"{fmt_mb(usage)} ({esc(memory.get('usage_source', 'usage'))})"
    else:
        usage = _number(memory["rss_mb"])
        text = f"{fmt_mb(memory['rss_mb'])} RSS"
    budget = _number(memory.get("budget_mb"))  # older daemon
    if budget:
        text += f" of {fmt_mb(budget)} budget"
        if usage is not None:
            text += f" ({usage / budget:.0%})"
    return f"{text}; level {shown_level}"


PLAN_KEYS = {"micro_batch", "accumulation", "checkpointing", "optimizer"}


def describe_plan(plan: PlanStatus) -> str:
    text = f"micro-batch {fmt_int(plan['micro_batch'])} x {fmt_int(plan['accumulation'])} accumulation"
    text += f", checkpointing {'on' if plan['checkpointing'] else 'off'}"
    return text + f", optimizer {esc(plan['optimizer'])}"


def describe_last_update(last: LastUpdate) -> str:
    parts = ["accepted" if last["accepted"] else "rejected"]
    if last["version"] is not None:
        parts.append(f"v{esc(last['version'])}")
    if last["finished"]:
        parts.append(fmt_time(last["finished"]))
    if last["reason"]:
        parts.append(f"({fmt_other(last['reason'], 80)})")
    return " ".join(parts)


# -- status ------------------------------------------------------------------------------------


def render_status(out: Console, reply: StatusReply) -> None:
    out.print(f"[bold]{esc(reply['device'])}[/bold]  up {fmt_duration(reply.get('uptime_s'))}")  # older daemon
    table = key_value_table()
    describers: dict[str, Callable[[Any], str]] = {
        "store": describe_store,
        "ingest": describe_ingest,
        "adapter": describe_adapter,
        "drift": describe_drift,
        "memory": describe_memory,
        "scoring": describe_scoring,
    }
    for key, describe in describers.items():
        part = section(reply, key)
        if part is not None:
            table.add_row(key, describe(part))
    training = section(reply, "training")
    if training is not None:
        table.add_row("training", esc(training["state"]))
        if training["plan"] is not None:
            table.add_row("  plan", describe_plan(training["plan"]))
        if training["last"]:
            table.add_row("  last", describe_last_update(training["last"]))
    shown = {"ok", "device", "uptime_s", "training", *describers}
    for key, value in reply.items():
        if key not in shown:
            table.add_row(esc(key), fmt_other(value))
    out.print(table)


# -- adapter / adapters ------------------------------------------------------------------------


def render_adapter(out: Console, reply: AdapterReply) -> None:
    adapter = reply["adapter"]
    if adapter["version"] is None:
        out.print(NO_BASE if adapter.get("base") is False else "serving the base model only (no adapter yet)")  # older daemon
        return
    out.print(f"serving adapter [bold]v{esc(adapter['version'])}[/bold]")
    table = key_value_table()
    table.add_row("created", fmt_time(adapter["created"]))
    table.add_row("size", fmt_bytes(adapter["size_bytes"]))
    table.add_row("val_loss", fmt_float(adapter["val_loss"]))
    before, after = adapter.get("metrics_before") or {}, adapter.get("metrics_after") or {}
    for key, label in (("recent_val_loss", "recent loss"), ("replay_val_loss", "replay loss")):
        if key in before or key in after:
            table.add_row(label, fmt_change(before.get(key), after.get(key)))
    plan = adapter.get("plan")
    if plan:
        table.add_row("start plan", describe_plan(plan) if PLAN_KEYS <= set(plan) else fmt_other(plan))  # type: ignore[arg-type]
    blocks = adapter.get("chosen_blocks")
    if blocks:
        table.add_row("trained blocks", ", ".join(esc(b) for b in blocks))
    if adapter.get("peak_rss_mb") is not None:
        table.add_row("update peak RSS", fmt_mb(adapter.get("peak_rss_mb")))
    if adapter.get("reason"):
        table.add_row("reason", fmt_other(adapter.get("reason")))
    # `base` says whether a base model exists, which matters only while no adapter serves; the
    # rest are keys of a newer daemon, numbers rounded.
    shown = {"version", "created", "size_bytes", "val_loss", "base", "metrics_before", "metrics_after", "plan",
             "chosen_blocks", "peak_rss_mb", "reason"}  # fmt: skip
    for key, value in adapter.items():
        if key not in shown and value not in (None, {}, []):
            table.add_row(esc(key), fmt_float(value) if isinstance(value, float) else fmt_other(value))
    out.print(table)


def render_adapters(out: Console, reply: AdaptersReply) -> None:
    from rich.table import Table

    adapters, current = reply["adapters"], reply["current"]
    if not adapters:
        out.print("no adapters yet (serving the base model)")
        return
    table = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for name, justify in (("", "left"), ("version", "right"), ("created", "left"), ("size", "right"),
                          ("val_loss", "right"), ("recent loss", "right"), ("replay loss", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for adapter in adapters:
        metrics = adapter["metrics"]
        table.add_row(
            "*" if adapter["current"] else "",
            f"v{esc(adapter['version'])}",
            fmt_time(adapter["created"]),
            fmt_bytes(adapter["size_bytes"]),
            fmt_float(adapter["val_loss"]),
            fmt_change(metrics["recent_before"], metrics["recent_after"]),
            fmt_change(metrics["replay_before"], metrics["replay_after"]),
            style="bold" if adapter["current"] else None,
        )
    out.print(table)
    out.print(f"current: v{esc(current)}" if current is not None else "current: base model (no adapter served)")


# -- drift -------------------------------------------------------------------------------------


def render_drift(out: Console, reply: DriftReply) -> None:
    from rich.table import Table

    drift = reply["drift"]
    out.print(f"drift: {describe_drift(drift)}")
    if not drift["channels"]:
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("channel", "left"), ("state", "left"), ("count", "right"), ("last detected", "left"),
                          ("input PSI", "right"), ("residual", "right"), ("baseline", "right"), ("ratio", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for name, channel in drift["channels"].items():
        level, baseline = channel["residual_level"], channel["residual_baseline"]
        state = channel["state"]
        window = channel.get("residual_window")
        table.add_row(
            esc(name),
            "[red]drift[/red]" if state == "drift" else esc(state),
            fmt_int(channel["detections"]),
            fmt_time(channel["last_detected"]),
            _psi_cell(channel.get("psi")),
            fmt_float(level),
            fmt_float(baseline) if baseline is not None or window is None else _learning(window),
            f"{level / baseline:.2f}" if level is not None and baseline else NONE,
        )
    # Never ellipsise a column (the default width of piped output is 80): let long lines be long.
    out.width = max(out.width, 120)
    out.print(table)


def _learning(window: PsiStatus | ResidualWindowStatus) -> str:
    return f"learning {window['window_filled']:.0%}"


def _psi_cell(psi: PsiStatus | None) -> str:
    """PSI against the reference, or how far the reference is learnt."""
    if psi is None:
        return NONE
    if psi["reference"] == "learning" or psi["value"] is None:
        return _learning(psi)
    return fmt_float(psi["value"])


# -- train / rollback --------------------------------------------------------------------------


def render_train(out: Console, reply: TrainReply) -> int:
    message, state = esc(reply["message"]), esc(reply["state"])
    if not reply["accepted"]:
        out.print(f"update not started: {message or 'the daemon declined'} (trainer {state})")
        return EXIT_ERROR
    # The daemon's message says what happens to the request ("update requested: it starts when
    # ...", "an update is already running"): shown as it is, not under a heading repeating it.
    out.print(f"{message or 'update requested'} (trainer {state})")
    return EXIT_OK


def render_rollback(out: Console, reply: RollbackReply) -> None:
    out.print(f"now serving {describe_adapter(reply['adapter'])}")
