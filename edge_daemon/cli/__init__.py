"""The `edge-daemon` command line: argument parsing and human or `--json` output, nothing else.

Each subcommand is registered in COMMANDS as (help, example, argument setup, handler); library
errors become messages and exit codes only here (main). The client commands are in commands.py,
their rendering in render.py, the local ones in local.py. rich is imported only for human output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from edge_daemon import __version__
from edge_daemon.cli import commands, local
from edge_daemon.cli.commands import add_socket_options
from edge_daemon.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from edge_daemon.errors import DaemonUnreachable, EdgeDaemonError

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


register("run", "run the daemon in the foreground (systemd runs this)",
         "edge-daemon run --config /etc/edge-daemon/config.toml", local.setup_run, local.run)  # fmt: skip
register("validate-config", "check a config file; exit 1 with field-path errors if invalid",
         "edge-daemon validate-config /etc/edge-daemon/config.toml", local.setup_validate, local.validate)  # fmt: skip
register("status", "adapter version, drift, store, ingestion, memory and training at a glance",
         "edge-daemon status\n  edge-daemon status --json --config /etc/edge-daemon/config.toml", add_socket_options, commands.status)  # fmt: skip
register("adapter", "the adapter being served (or the base model)",
         "edge-daemon adapter --json", add_socket_options, commands.adapter)  # fmt: skip
register("adapters", "every stored adapter version with its validation metrics",
         "edge-daemon adapters --socket /run/edge-daemon/control.sock", add_socket_options, commands.adapters)  # fmt: skip
register("drift", "drift state and detections per channel",
         "edge-daemon drift --json | jq '.drift.channels'", add_socket_options, commands.drift)  # fmt: skip
register("train", "ask for an update now (root or the daemon's user/group); exit 1 if not accepted",
         "sudo edge-daemon train", add_socket_options, commands.train)  # fmt: skip
register("rollback", "serve an earlier adapter version (root or the daemon's user/group)",
         "sudo edge-daemon rollback 3", commands.setup_rollback, commands.rollback)  # fmt: skip
register("pretrain", "train the base model from a CSV or from the replay store",
         "edge-daemon pretrain --config /etc/edge-daemon/config.toml --data motor.csv", local.setup_pretrain, local.pretrain)  # fmt: skip
register("demo", "the whole mission in a few minutes: broker, daemon, sample motor, drift, adaptation",
         "edge-daemon demo", local.setup_demo, local.demo)  # fmt: skip
register("install", "install as a systemd service (venv under /opt, unit, default config)",
         "sudo edge-daemon install", local.setup_install, local.install_or_uninstall)  # fmt: skip
register("uninstall", "remove the service; keeps data and config unless --purge",
         "sudo edge-daemon uninstall --purge", local.setup_uninstall, local.install_or_uninstall)  # fmt: skip
register("report", "plots of a state directory: channels with forecasts, anomaly scores, drift, adapters, update memory",
         "edge-daemon report --config /etc/edge-daemon/config.toml --out ./report", local.setup_report, local.report)  # fmt: skip


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
    elif exc.cause == "not_socket":
        hints += ["the daemon's socket is `[device] socket` in its config; pass that path, or --config CONFIG"]
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
    except EdgeDaemonError as exc:
        # A ConfigError's message lists its problems already (one `  field: message` line each).
        print(f"edge-daemon: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
