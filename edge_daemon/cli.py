"""The `edge-daemon` command line: argument parsing and human or `--json` output, nothing else.

Each subcommand is registered in COMMANDS as (help with an example, argument setup, handler);
library errors are turned into messages and exit codes only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_daemon import __version__
from edge_daemon.config import load_config
from edge_daemon.control import request
from edge_daemon.errors import ConfigError, EdgeDaemonError

DEFAULT_SOCKET = Path("/run/edge-daemon/control.sock")

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


# -- shared helpers for client commands ---------------------------------------------------------


def add_socket_options(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    """`--socket PATH` / `--config PATH` (and `--json`) for commands that talk to the daemon."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help=f"control socket (default {DEFAULT_SOCKET})")
    where.add_argument("--config", type=Path, help="read the socket path from this config")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")


def socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    if getattr(args, "config", None):
        return load_config(args.config).device.socket
    return DEFAULT_SOCKET


def ask(args: argparse.Namespace, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send a request to the daemon; raise EdgeDaemonError if it answers `ok: false`."""
    reply = request(socket_path(args), payload, timeout=timeout)
    if not reply.get("ok"):
        raise EdgeDaemonError(str(reply.get("error", "the daemon refused the request")))
    return reply


def print_json(reply: dict[str, Any]) -> None:
    print(json.dumps(reply, indent=2, sort_keys=True, default=str))


# -- run ---------------------------------------------------------------------------------------


def _setup_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file")


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logging.basicConfig(
        level=config.device.log_level,
        # systemd's journal adds its own timestamps; the level and logger name still help.
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # paho logs every packet at DEBUG through its own logger only if asked; keep it quiet.
    logging.getLogger("paho").setLevel(logging.WARNING)
    from edge_daemon.daemon import Daemon

    return Daemon(config).run()


# -- validate-config ---------------------------------------------------------------------------


def _setup_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="TOML config file to check")


def _validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"{args.path}: invalid", file=sys.stderr)
        for field_path, message in exc.problems:
            print(f"  {field_path}: {message}", file=sys.stderr)
        return 1
    print(f"{args.path}: valid (device {config.device.id}, {len(config.channels.names)} channels)")
    return 0


# -- status ------------------------------------------------------------------------------------


def _setup_status(parser: argparse.ArgumentParser) -> None:
    add_socket_options(parser)


def _format_status(reply: dict[str, Any]) -> str:
    lines = [f"device   {reply.get('device')}   up {reply.get('uptime_s', 0):.0f} s"]
    store = reply.get("store")
    if store:
        lines.append(f"store    {store.get('readings', 0):,} readings, {store.get('bytes', 0) / 1e6:.1f} MB")
    ingest = reply.get("ingest")
    if ingest:
        state = "connected" if ingest.get("connected") else "DISCONNECTED"
        lines.append(
            f"ingest   {state}; {ingest.get('received', 0):,} messages, {ingest.get('stored', 0):,} stored,"
            f" {ingest.get('duplicates', 0):,} duplicates, {ingest.get('rejected', 0):,} rejected"
        )
        by_reason = ingest.get("rejected_by_reason") or {}
        if by_reason:
            lines.append("         rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())))
    shown = {"ok", "device", "uptime_s", "store", "ingest"}
    for key, value in reply.items():
        if key not in shown:
            lines.append(f"{key:<8} {json.dumps(value, default=str)}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    reply = ask(args, {"cmd": "status"})
    if args.json:
        print_json(reply)
    else:
        print(_format_status(reply))
    return 0


register("run", "run the daemon in the foreground (systemd runs this)",
         "edge-daemon run --config /etc/edge-daemon/config.toml", _setup_run, _run)  # fmt: skip
register("validate-config", "check a config file; exit 1 with field-path errors if invalid",
         "edge-daemon validate-config /etc/edge-daemon/config.toml", _setup_validate, _validate)  # fmt: skip
register("status", "show store, ingestion and (later) adapter, drift, memory, training",
         "edge-daemon status --json --socket /run/edge-daemon/control.sock", _setup_status, _status)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-daemon",
        description="Continual-learning daemon for edge devices.",
        epilog="Run 'edge-daemon COMMAND --help' for a command's options and an example.",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except EdgeDaemonError as exc:
        print(f"edge-daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
