"""The client commands (status, adapter, adapters, drift, train, rollback): their options, the
request each sends over the control socket, and `--json` or rendered output of the reply.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_daemon.cli import render
from edge_daemon.cli.exits import EXIT_OK
from edge_daemon.control.client import request
from edge_daemon.errors import EdgeDaemonError
from edge_daemon.control import replies

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_SOCKET = Path("/run/edge-daemon/control.sock")


class ErrorReply(EdgeDaemonError):
    """The daemon answered `{"ok": false}`; `reply` is what it sent."""

    def __init__(self, reply: replies.ErrorReply) -> None:
        # Whatever answered may not be this daemon's version (or this daemon): never a KeyError.
        super().__init__(str(reply.get("error", "the daemon refused the request")))
        self.reply = reply


# -- shared by the client commands --------------------------------------------------------------


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


def ask(args: argparse.Namespace, payload: replies.JsonObject) -> replies.JsonObject:
    """Send a request to the daemon; raise ErrorReply if it answers `ok: false`."""
    path = socket_path(args)
    args.socket_used = path
    reply = request(path, payload, timeout=getattr(args, "timeout", 10.0))
    if reply.get("ok") is not True:
        raise ErrorReply(reply)  # type: ignore[arg-type]
    return reply


def print_json(reply: Any) -> None:
    print(json.dumps(reply, indent=2, sort_keys=True, default=str))


def client_command(args: argparse.Namespace, payload: replies.JsonObject, render_reply: Callable[[Console, Any], int | None]) -> int:
    """Ask, then print the reply as JSON (`--json`) or through `render_reply`, which may return an exit code."""
    try:
        reply = ask(args, payload)
    except ErrorReply as exc:
        if args.json:
            print_json(exc.reply)  # scripts get the error object on stdout as well
        raise
    if args.json:
        print_json(reply)
        return EXIT_OK
    code = render_reply(render.console(), reply)
    return EXIT_OK if code is None else code


def positive_version(text: str) -> int:
    try:
        version = int(text.lstrip("vV"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (e.g. 3 or v3)") from None
    if version < 1:
        raise argparse.ArgumentTypeError(f"version must be >= 1, got {version}")
    return version


# -- the commands ---------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "status"}, render.render_status)


def adapter(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "adapter"}, render.render_adapter)


def adapters(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "adapters"}, render.render_adapters)


def drift(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "drift"}, render.render_drift)


def train(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "train"}, render.render_train)


def setup_rollback(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=positive_version, metavar="VERSION", help="adapter version to serve (see `edge-daemon adapters`)")
    add_socket_options(parser)


def rollback(args: argparse.Namespace) -> int:
    return client_command(args, {"cmd": "rollback", "version": args.version}, render.render_rollback)
