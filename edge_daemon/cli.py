"""The `edge-daemon` command line: argument parsing and human or `--json` output, nothing else.

Each subcommand is registered in COMMANDS as (help, example, argument setup, handler); library
errors become messages and exit codes only here. rich is imported only for human output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from edge_daemon import __version__
from edge_daemon.control.client import request
from edge_daemon.errors import ConfigError, DaemonUnreachable, EdgeDaemonError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

DEFAULT_SOCKET = Path("/run/edge-daemon/control.sock")

# Exit codes. 2 is argparse's for a usage error, so an unreachable daemon gets its own.
EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered `ok: false`, a config is invalid, an update was not accepted
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # nothing answered on the socket

Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    help: str
    example: str
    setup: Setup
    run: Run


# Subcommand name -> Command, in the order `--help` lists them. Add more with `register`.
COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, example: str, setup: Setup, run: Run) -> None:
    COMMANDS[name] = Command(help, example, setup, run)


class ErrorReply(EdgeDaemonError):
    """The daemon answered `{"ok": false}`; `reply` is what it sent."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(str(reply.get("error", "the daemon refused the request")))
        self.reply = reply


# -- shared helpers for client commands ---------------------------------------------------------


def add_socket_options(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    """`--socket PATH` / `--config PATH`, `--timeout` (and `--json`) for commands that talk to the daemon."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help=f"control socket (default {DEFAULT_SOCKET})")
    where.add_argument("--config", type=Path, help="read the socket path from this config file")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the daemon (default 10)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")


def socket_path(args: argparse.Namespace) -> Path:
    """The socket to talk to; records where it came from (for the unreachable message)."""
    if getattr(args, "socket", None):
        args.socket_source = "from --socket"
        return Path(args.socket)
    if getattr(args, "config", None):
        # Lazy: pydantic costs ~0.2 s of import, which `--socket` and the default path skip.
        from edge_daemon.config import load_config

        args.socket_source = f"from {args.config}"
        return load_config(args.config).device.socket
    args.socket_source = "the default; use --socket PATH or --config PATH if the daemon uses another"
    return DEFAULT_SOCKET


def ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    """Send a request to the daemon; raise ErrorReply if it answers `ok: false`."""
    path = socket_path(args)
    args.socket_used = path
    reply = request(path, payload, timeout=getattr(args, "timeout", 10.0))
    if reply.get("ok") is not True:
        raise ErrorReply(reply)
    return reply


def print_json(reply: dict[str, Any]) -> None:
    print(json.dumps(reply, indent=2, sort_keys=True, default=str))


def client_command(
    args: argparse.Namespace, payload: dict[str, Any], render: Callable[[Console, dict[str, Any]], int | None]
) -> int:
    """Ask, then print the reply as JSON (`--json`) or through `render`; render may return an exit code."""
    try:
        reply = ask(args, payload)
    except ErrorReply as exc:
        if args.json:
            print_json(exc.reply)  # scripts get the error object on stdout as well
        raise
    if args.json:
        print_json(reply)
        return EXIT_OK
    code = render(console(), reply)
    return EXIT_OK if code is None else code


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


def section(reply: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = reply.get(key)
    return value if isinstance(value, dict) else None


LEVEL_STYLE = {"normal": "green", "elevated": "yellow", "high": "red", "critical": "bold red"}


# -- one-line summaries of the status sections ----------------------------------------------------


def describe_store(store: dict[str, Any]) -> str:
    return f"{fmt_int(store.get('readings'))} readings, {fmt_bytes(store.get('bytes'))}"


def describe_ingest(ingest: dict[str, Any]) -> str:
    parts = []
    if "connected" in ingest:
        parts.append("connected" if ingest["connected"] else "[red]DISCONNECTED[/red]")
    counts = [f"{fmt_int(ingest.get(k))} {k}" for k in ("received", "stored", "duplicates", "rejected") if k in ingest]
    text = "; ".join(parts + [", ".join(counts)] if counts else parts) or NONE
    by_reason = ingest.get("rejected_by_reason")
    if isinstance(by_reason, dict) and by_reason:
        text += " (" + ", ".join(f"{esc(k)} {fmt_int(v)}" for k, v in sorted(by_reason.items())) + ")"
    clock = ingest.get("clock")
    if isinstance(clock, dict) and (clock.get("trusted") is False or clock.get("holding")):
        text += f"; [yellow]clock not trusted[/yellow], {fmt_int(clock.get('holding'))} readings held"
    return text


NO_BASE = "no base model yet (one is trained from the store once it holds enough data)"


def describe_adapter(adapter: dict[str, Any]) -> str:
    version = adapter.get("version")
    if version is None:
        return NO_BASE if adapter.get("base") is False else "base model only (no adapter yet)"
    details = [f"created {fmt_time(adapter.get('created'))}", fmt_bytes(adapter.get("size_bytes"))]
    if _number(adapter.get("val_loss")) is not None:
        details.append(f"val_loss {fmt_float(adapter.get('val_loss'))}")
    return f"v{esc(version)} (" + ", ".join(details) + ")"


def drifted_channels(drift: dict[str, Any]) -> list[str]:
    channels = drift.get("channels")
    if not isinstance(channels, dict):
        return []
    return [name for name, ch in channels.items() if isinstance(ch, dict) and ch.get("state") == "drift"]


def describe_drift(drift: dict[str, Any]) -> str:
    drifted = drifted_channels(drift)
    channels = drift.get("channels")
    count = len(channels) if isinstance(channels, dict) else 0
    if drift.get("detected") or drifted:
        text = "[red]DETECTED[/red]" + (" on " + ", ".join(esc(name) for name in drifted) if drifted else "")
    else:
        text = f"none ({count} channels watched)" if count else "none"
    if drift.get("last_detected"):
        text += f"; last detection {fmt_time(drift.get('last_detected'))}"
    return text


def describe_scoring(scoring: dict[str, Any]) -> str:
    text = f"{scoring.get('scored', 0):,} steps scored, {scoring.get('anomalies', 0):,} anomalies"
    serving = scoring.get("serving")
    if isinstance(serving, dict):
        served = str(serving.get("served", NONE))
        by_channel = serving.get("served_by_channel")
        if served == "mixed" and isinstance(by_channel, dict):
            served = ", ".join(f"{name} for {channel}" for channel, name in by_channel.items())
        text += f"; serving [bold]{esc(served)}[/bold]"
        mae = serving.get("mae")
        if isinstance(mae, dict) and serving.get("steps_compared"):
            errors = ", ".join(f"{esc(name)} {fmt_float(value)}" for name, value in mae.items() if value is not None)
            text += f" (mean |error| {errors} over {serving['steps_compared']:,} steps)"
    return text


def describe_memory(memory: dict[str, Any]) -> str:
    level = str(memory.get("level", NONE))
    style = LEVEL_STYLE.get(level, "")
    shown_level = f"[{style}]{level}[/{style}]" if style else esc(level)
    text = f"{fmt_mb(memory.get('rss_mb'))} RSS"
    rss, budget = _number(memory.get("rss_mb")), _number(memory.get("budget_mb"))
    if budget:
        text += f" of {fmt_mb(budget)} budget"
        if rss is not None:
            text += f" ({rss / budget:.0%})"
    return f"{text}; level {shown_level}"


def describe_plan(plan: dict[str, Any]) -> str:
    micro, accumulation = plan.get("micro_batch"), plan.get("accumulation")
    text = f"micro-batch {fmt_int(micro)} x {fmt_int(accumulation)} accumulation"
    if "checkpointing" in plan:
        text += f", checkpointing {'on' if plan['checkpointing'] else 'off'}"
    if plan.get("optimizer"):
        text += f", optimizer {esc(plan['optimizer'])}"
    return text


def describe_last_update(last: dict[str, Any]) -> str:
    parts = []
    if "accepted" in last:
        parts.append("accepted" if last["accepted"] else "rejected")
    if last.get("version") is not None:
        parts.append(f"v{esc(last['version'])}")
    for key in ("finished", "ended", "time", "at", "started"):
        if last.get(key):
            parts.append(fmt_time(last[key]))
            break
    if _number(last.get("wall_time_s")) is not None:
        parts.append(f"in {fmt_duration(last['wall_time_s'])}")
    if last.get("reason"):
        parts.append(f"({fmt_other(last['reason'], 80)})")
    if not parts:
        scalars = {k: v for k, v in last.items() if not isinstance(v, (dict, list))}
        return fmt_other(scalars) if scalars else NONE
    return " ".join(parts)


# -- status ------------------------------------------------------------------------------------


def render_status(out: Console, reply: dict[str, Any]) -> None:
    out.print(f"[bold]{esc(reply.get('device', '?'))}[/bold]  up {fmt_duration(reply.get('uptime_s'))}")
    table = key_value_table()
    describers: dict[str, Callable[[dict[str, Any]], str]] = {
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
        table.add_row("training", esc(training.get("state", NONE)))
        plan = training.get("plan")
        if isinstance(plan, dict):
            table.add_row("  plan", describe_plan(plan))
        last = training.get("last")
        if isinstance(last, dict) and last:
            table.add_row("  last", describe_last_update(last))
    shown = {"ok", "device", "uptime_s", "training", *describers}
    for key, value in reply.items():
        if key not in shown:
            table.add_row(esc(key), fmt_other(value))
    out.print(table)


def _status(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "status"}, render_status)


# -- adapter / adapters ------------------------------------------------------------------------


def render_adapter(out: Console, reply: dict[str, Any]) -> None:
    adapter = section(reply, "adapter") or {"version": None}
    if adapter.get("version") is None:
        out.print(NO_BASE if adapter.get("base") is False else "serving the base model only (no adapter yet)")
        return
    out.print(f"serving adapter [bold]v{esc(adapter['version'])}[/bold]")
    table = key_value_table()
    table.add_row("created", fmt_time(adapter.get("created")))
    table.add_row("size", fmt_bytes(adapter.get("size_bytes")))
    table.add_row("val_loss", fmt_float(adapter.get("val_loss")))
    for key, value in adapter.items():
        if key not in ("version", "created", "size_bytes", "val_loss") and value not in (None, {}, []):
            table.add_row(esc(key), fmt_other(value))
    out.print(table)


def _adapter(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "adapter"}, render_adapter)


def render_adapters(out: Console, reply: dict[str, Any]) -> None:
    from rich.table import Table

    adapters = [a for a in reply.get("adapters") or [] if isinstance(a, dict)]
    current = reply.get("current")
    if not adapters:
        out.print("no adapters yet (serving the base model)")
        return
    table = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for name, justify in (("", "left"), ("version", "right"), ("created", "left"), ("size", "right"),
                          ("val_loss", "right"), ("recent loss", "right"), ("replay loss", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for adapter in adapters:
        is_current = bool(adapter.get("current")) or (current is not None and adapter.get("version") == current)
        metrics = adapter.get("metrics") if isinstance(adapter.get("metrics"), dict) else {}
        table.add_row(
            "*" if is_current else "",
            f"v{esc(adapter.get('version', '?'))}",
            fmt_time(adapter.get("created")),
            fmt_bytes(adapter.get("size_bytes")),
            fmt_float(adapter.get("val_loss")),
            fmt_change(metrics.get("recent_before"), metrics.get("recent_after")),
            fmt_change(metrics.get("replay_before"), metrics.get("replay_after")),
            style="bold" if is_current else None,
        )
    out.print(table)
    out.print(f"current: v{esc(current)}" if current is not None else "current: base model (no adapter served)")


def _adapters(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "adapters"}, render_adapters)


# -- drift -------------------------------------------------------------------------------------


def render_drift(out: Console, reply: dict[str, Any]) -> None:
    from rich.table import Table

    drift = section(reply, "drift") or {}
    out.print(f"drift: {describe_drift(drift)}")
    channels = drift.get("channels")
    if not isinstance(channels, dict) or not channels:
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("channel", "left"), ("state", "left"), ("count", "right"), ("last detected", "left"),
                          ("input PSI", "right"), ("residual", "right"), ("baseline", "right"), ("ratio", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for name, channel in channels.items():
        channel = channel if isinstance(channel, dict) else {}
        level, baseline = _number(channel.get("residual_level")), _number(channel.get("residual_baseline"))
        state = str(channel.get("state", NONE))
        window = channel.get("residual_window") if isinstance(channel.get("residual_window"), dict) else {}
        table.add_row(
            esc(name),
            "[red]drift[/red]" if state == "drift" else esc(state),
            fmt_int(channel.get("detections")),
            fmt_time(channel.get("last_detected")),
            _psi_cell(channel.get("psi")),
            fmt_float(level),
            fmt_float(baseline) if baseline is not None or not window else _learning(window),
            f"{level / baseline:.2f}" if level is not None and baseline else NONE,
        )
    # Never ellipsise a column (the default width of piped output is 80): let long lines be long.
    out.width = max(out.width, 120)
    out.print(table)


def _learning(window: dict[str, Any]) -> str:
    filled = _number(window.get("window_filled"))
    return f"learning {filled:.0%}" if filled is not None else "learning"


def _psi_cell(psi: Any) -> str:
    """PSI against the reference, or how far the reference is learnt."""
    if not isinstance(psi, dict):
        return NONE
    if psi.get("reference") == "learning" or psi.get("value") is None:
        return _learning(psi)
    value = _number(psi.get("value"))
    return fmt_float(value)


def _drift(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "drift"}, render_drift)


# -- train / rollback --------------------------------------------------------------------------


def render_train(out: Console, reply: dict[str, Any]) -> int:
    message = esc(reply.get("message") or "")
    state = esc(reply.get("state", NONE))
    if reply.get("accepted") is False:
        out.print(f"update not started: {message or 'the daemon declined'} (trainer {state})")
        return EXIT_ERROR
    out.print(f"update requested (trainer {state})" + (f": {message}" if message else ""))
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "train"}, render_train)


def render_rollback(out: Console, reply: dict[str, Any]) -> None:
    adapter = section(reply, "adapter") or {"version": None}
    out.print(f"now serving {describe_adapter(adapter)}")


def positive_version(text: str) -> int:
    try:
        version = int(text.lstrip("vV"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (e.g. 3 or v3)") from None
    if version < 1:
        raise argparse.ArgumentTypeError(f"version must be >= 1, got {version}")
    return version


def _setup_rollback(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=positive_version, metavar="VERSION", help="adapter version to serve (see `edge-daemon adapters`)")
    add_socket_options(parser)


def _rollback(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "rollback", "version": args.version}, render_rollback)


# -- run ---------------------------------------------------------------------------------------


def _setup_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file")


def _run(args: argparse.Namespace) -> NoReturn:
    from edge_daemon.config import load_config

    from edge_daemon.logs import setup_logging

    config = load_config(args.config)
    # Under journald: `<N>` priority prefixes and no timestamps (the journal adds its own).
    setup_logging(config.device.log_level)
    # paho logs every packet at DEBUG through its own logger only if asked; keep it quiet.
    logging.getLogger("paho").setLevel(logging.WARNING)
    # apscheduler logs every job run at INFO: noise in the journal every few seconds.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    from edge_daemon.daemon import Daemon

    code = Daemon(config).run()
    # Every part is stopped and everything is flushed: end the process here rather than in
    # interpreter finalization, where a daemon thread still inside a native call (torch's
    # own threads, for one) is unwound and aborts the process ("terminate called without an
    # active exception", exit by SIGABRT) after a clean stop.
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive())
    if alive:
        logging.getLogger("edge_daemon.cli").info("exiting with threads still running: %s", ", ".join(alive))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- validate-config ---------------------------------------------------------------------------


def _setup_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="TOML config file to check")


def _validate(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config

    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"{args.path}: invalid", file=sys.stderr)
        for field_path, message in exc.problems:
            print(f"  {field_path}: {message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.path}: valid (device {config.device.id}, {len(config.channels.names)} channels)")
    return EXIT_OK


register("run", "run the daemon in the foreground (systemd runs this)",
         "edge-daemon run --config /etc/edge-daemon/config.toml", _setup_run, _run)  # fmt: skip
register("validate-config", "check a config file; exit 1 with field-path errors if invalid",
         "edge-daemon validate-config /etc/edge-daemon/config.toml", _setup_validate, _validate)  # fmt: skip
register("status", "adapter version, drift, store, ingestion, memory and training at a glance",
         "edge-daemon status\n  edge-daemon status --json --config /etc/edge-daemon/config.toml", add_socket_options, _status)  # fmt: skip
register("adapter", "the adapter being served (or the base model)",
         "edge-daemon adapter --json", add_socket_options, _adapter)  # fmt: skip
register("adapters", "every stored adapter version with its validation metrics",
         "edge-daemon adapters --socket /run/edge-daemon/control.sock", add_socket_options, _adapters)  # fmt: skip
register("drift", "drift state and detections per channel",
         "edge-daemon drift --json | jq '.drift.channels'", add_socket_options, _drift)  # fmt: skip
register("train", "ask for an update now (root or the daemon's user/group); exit 1 if not accepted",
         "sudo edge-daemon train", add_socket_options, _train)  # fmt: skip
register("rollback", "serve an earlier adapter version (root or the daemon's user/group)",
         "sudo edge-daemon rollback 3", _setup_rollback, _rollback)  # fmt: skip


# -- pretrain / demo / install ------------------------------------------------------------------


def _setup_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file (base model goes to state_dir/base)")
    parser.add_argument("--data", type=Path, help="CSV: wide 'ts,<channel>,...' or long 'ts,channel,value' (default: the store)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default [model] pretrain_steps)")


def _pretrain(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config
    from edge_daemon.logs import setup_logging
    from edge_daemon.pretrain import pretrain_from_config

    config = load_config(args.config)
    setup_logging(config.device.log_level)
    metrics = pretrain_from_config(config, csv_path=args.data, progress=sys.stderr.isatty(), steps=args.steps)
    print(
        f"base model saved to {config.base_dir}: validation loss {metrics.get('val_loss', float('nan')):.4g} "
        f"(persistence {metrics.get('persistence_val_loss', float('nan')):.4g}), {metrics.get('steps')} steps"
    )
    held_out = metrics.get("held_out") or {}
    mae = held_out.get("mae") or {}
    if mae:
        print("one-step MAE on held-out windows: " + ", ".join(f"{name} {value:.4g}" for name, value in mae.items()))
        served = held_out.get("serve")
        if served and served != "model":
            print(f"the model loses to {served}: the daemon serves {served} until a model beats it")
    return EXIT_OK


def _setup_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="where to keep the demo's state (default: a new temp dir)")
    parser.add_argument("--full-size", action="store_true", help="use the default (~1e5-parameter) model instead of the quick one")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting for an adapter after this many seconds")


def _demo(args: argparse.Namespace) -> int:
    from edge_daemon.demo import run_demo
    from edge_daemon.logs import setup_logging

    setup_logging("WARNING")
    summary = run_demo(quick=not args.full_size, state_dir=args.state_dir, timeout_s=args.timeout)
    return EXIT_OK if summary.get("update_accepted") and summary.get("readings_lost") == 0 else EXIT_ERROR


def _setup_install(parser: argparse.ArgumentParser) -> None:
    from edge_daemon.install import add_arguments

    add_arguments(parser, "install")


def _setup_uninstall(parser: argparse.ArgumentParser) -> None:
    from edge_daemon.install import add_arguments

    add_arguments(parser, "uninstall")


def _install_or_uninstall(args: argparse.Namespace) -> int:
    from edge_daemon.install import run

    return run(args)


register("pretrain", "train the base model from a CSV or from the replay store",
         "edge-daemon pretrain --config /etc/edge-daemon/config.toml --data motor.csv", _setup_pretrain, _pretrain)  # fmt: skip
register("demo", "the whole mission in a few minutes: broker, daemon, sample motor, drift, adaptation",
         "edge-daemon demo", _setup_demo, _demo)  # fmt: skip
register("install", "install as a systemd service (venv under /opt, unit, default config)",
         "sudo edge-daemon install", _setup_install, _install_or_uninstall)  # fmt: skip
register("uninstall", "remove the service; keeps data and config unless --purge",
         "sudo edge-daemon uninstall --purge", _setup_uninstall, _install_or_uninstall)  # fmt: skip


def _setup_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file (the report reads its state_dir)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files and index.html (created if missing)")
    parser.add_argument("--hours", type=float, help="only the newest H hours of the store (default: all of it)")


def _report(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config
    from edge_daemon.report import write_report

    config = load_config(args.config)
    for path in write_report(config, args.out, hours=args.hours):
        print(path)
    return EXIT_OK


register("report", "plots of a state directory: channels with forecasts, anomaly scores, drift, adapters, update memory",
         "edge-daemon report --config /etc/edge-daemon/config.toml --out ./report", _setup_report, _report)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-daemon",
        description="Continual-learning daemon for edge devices.",
        epilog=(
            "Run 'edge-daemon COMMAND --help' for a command's options and an example.\n"
            f"exit codes: {EXIT_OK} ok, {EXIT_ERROR} error reply or invalid input, {EXIT_USAGE} usage error,"
            f" {EXIT_UNREACHABLE} daemon unreachable"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-daemon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        cmd_parser = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=f"example:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.setup(cmd_parser)
        cmd_parser.set_defaults(handler=command.run)
    return parser


def unreachable_message(exc: DaemonUnreachable, args: argparse.Namespace) -> str:
    """What went wrong and what to check, most likely cause first."""
    path = getattr(args, "socket_used", None)
    source = getattr(args, "socket_source", "")
    hints = [f"socket path: {path} ({source})" if path else ""]
    running = "is the daemon running? check `systemctl status edge-daemon` and `journalctl -u edge-daemon`"
    group = "are you in the daemon's group? run as root or as a member of the socket's group (`id` shows yours)"
    if exc.cause == "permission":
        hints += [group, running]
    elif exc.cause == "timeout":
        hints += ["the daemon is up but not answering; check `journalctl -u edge-daemon`", running]
    else:
        hints += [running, group]
    return f"edge-daemon: cannot reach the daemon: {exc}\n" + "\n".join(f"  {h}" for h in hints if h)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DaemonUnreachable as exc:
        print(unreachable_message(exc, args), file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConfigError as exc:
        print(f"edge-daemon: {exc}", file=sys.stderr)
        for field_path, message in exc.problems:
            print(f"  {field_path}: {message}", file=sys.stderr)
        return EXIT_ERROR
    except EdgeDaemonError as exc:
        print(f"edge-daemon: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
