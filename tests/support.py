"""Helpers for tests and benchmarks that drive a daemon process: its config file, its status, waiting."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_daemon.control.client import request


def config_toml(data: dict[str, dict[str, Any]]) -> str:
    """Config sections as TOML: JSON scalars and lists of them are valid TOML values."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def daemon_status(socket_path: Path, timeout: float = 30.0) -> dict[str, Any] | None:
    """The daemon's `status` reply, or None while it is not listening (or answers with an error)."""
    try:
        reply = request(socket_path, {"cmd": "status"}, timeout=timeout)
    except Exception:
        return None
    return reply if reply.get("ok") else None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2, detail: Callable[[], Any] | None = None) -> Any:
    """The first truthy value of `predicate()`; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {detail()}" if detail else ""))
