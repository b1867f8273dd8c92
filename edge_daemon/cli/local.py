"""The commands that work on this machine, without the daemon's socket: run, validate-config,
pretrain, demo, install, uninstall and report. Each imports what it needs only when run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

from edge_daemon.cli.exits import EXIT_ERROR, EXIT_OK
from edge_daemon.errors import ConfigError

# -- run ---------------------------------------------------------------------------------------


def setup_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file")


def run(args: argparse.Namespace) -> NoReturn:
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


def setup_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="TOML config file to check")


def validate(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config

    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"{args.path}: invalid", file=sys.stderr)
        for field_path, message in exc.problems:
            print(f"  {field_path}: {message}", file=sys.stderr)
        return EXIT_ERROR
    from edge_daemon.mqtt.credentials import secret_file_warnings

    inputs = ", ".join(f"{mapping.format} on {mapping.topic}" for mapping in config.inputs) or "the native form"
    print(f"{args.path}: valid (device {config.device.id}, {len(config.channels.names)} channels; reading {inputs})")
    # Warnings leave the exit status alone: the config itself is valid. They name keys and
    # paths, never a secret's value.
    for warning in [*config.metrics.warnings(), *secret_file_warnings(config.mqtt, args.path)]:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


# -- pretrain / demo / install -------------------------------------------------------------------


def setup_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file (base model goes to state_dir/base)")
    parser.add_argument("--data", type=Path, help="CSV: wide 'ts,<channel>,...' or long 'ts,channel,value' (default: the store)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default [model] pretrain_steps)")


def pretrain(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config
    from edge_daemon.logs import setup_logging
    from edge_daemon.training.pretrain import pretrain_from_config

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


def setup_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="where to keep the demo's state (default: a new temp dir)")
    parser.add_argument("--full-size", action="store_true", help="use the default (~1e5-parameter) model instead of the quick one")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting for an adapter after this many seconds")


def demo(args: argparse.Namespace) -> int:
    from edge_daemon.demo import run_demo
    from edge_daemon.logs import setup_logging

    setup_logging("WARNING")
    summary = run_demo(quick=not args.full_size, state_dir=args.state_dir, timeout_s=args.timeout)
    return EXIT_OK if summary.get("update_accepted") and summary.get("readings_lost") == 0 else EXIT_ERROR


def setup_install(parser: argparse.ArgumentParser) -> None:
    from edge_daemon.install import add_arguments

    add_arguments(parser, "install")


def setup_uninstall(parser: argparse.ArgumentParser) -> None:
    from edge_daemon.install import add_arguments

    add_arguments(parser, "uninstall")


def install_or_uninstall(args: argparse.Namespace) -> int:
    from edge_daemon.install import run as run_install

    return run_install(args)


# -- report ------------------------------------------------------------------------------------


def setup_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML config file (the report reads its state_dir)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files and index.html (created if missing)")
    parser.add_argument("--hours", type=float, help="only the newest H hours of the store (default: all of it)")


def report(args: argparse.Namespace) -> int:
    from edge_daemon.config import load_config
    from edge_daemon.report import write_report

    config = load_config(args.config)
    for path in write_report(config, args.out, hours=args.hours):
        print(path)
    return EXIT_OK
