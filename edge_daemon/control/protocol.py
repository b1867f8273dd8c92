"""The control protocol: one JSON object per line each way, argument checks, and dispatching a line to a handler table.

Request `{"cmd": "<name>", ...}`; reply `{"ok": true, ...}` or `{"ok": false, "error": "<message>"}`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict, cast

from edge_daemon.errors import EdgeDaemonError
from edge_daemon.control.replies import ErrorReply, JsonObject, JsonValue

log = logging.getLogger(__name__)

# A reply on its way out: an `ErrorReply`, or `"ok": true` and a handler's reply (one of replies.py's TypedDicts).
Reply = Mapping[str, object]


class Request(TypedDict):
    """A request that passed `dispatch`'s checks: its command and the arguments `ARGUMENTS` checked."""

    cmd: str
    version: NotRequired[int]  # rollback's: an int >= 1


Handler = Callable[[Request], Mapping[str, object]]  # a reply: one of replies.py's TypedDicts
# Checks one argument's value; returns an error message, or None when the value is acceptable.
ArgCheck = Callable[[Any], "str | None"]
# Runs a handler on a checked request (name, handler, request); may raise like the handler.
Runner = Callable[[str, Handler, Request], Mapping[str, object]]

# A request line longer than this is refused (a real request is a few dozen bytes).
MAX_REQUEST_BYTES = 64 * 1024
# A reply can carry per-channel detail; still bounded so a client never reads forever.
MAX_REPLY_BYTES = 16 * 1024 * 1024


def positive_int(value: Any) -> str | None:
    """An integer >= 1; `true` is not 1 here, even though bool is an int subclass in Python."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a positive integer, got {type(value).__name__}"
    if value < 1:
        return f"must be a positive integer, got {value}"
    return None


# Required arguments per command (name -> check). Commands not listed take none.
ARGUMENTS: dict[str, dict[str, ArgCheck]] = {"rollback": {"version": positive_int}}


def error_reply(message: str) -> ErrorReply:
    """The failure reply: `{"ok": false, "error": message}`."""
    return ErrorReply(ok=False, error=message)


def _call(name: str, handler: Handler, request: Request) -> Mapping[str, object]:
    return handler(request)


def dispatch(
    line: bytes,
    handlers: dict[str, Handler],
    arguments: dict[str, dict[str, ArgCheck]] = ARGUMENTS,
    run: Runner = _call,
) -> Reply:
    """Reply to one request line: decode it, check its arguments, and have `run` call its handler.

    An EdgeDaemonError from `run` becomes `{"ok": false, "error": str(exc)}`; any other
    exception is logged and becomes `{"ok": false, "error": "internal error: ..."}`.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return error_reply("request is not valid UTF-8")
    try:
        raw: JsonValue = json.loads(text)
    except (ValueError, RecursionError):
        return error_reply("request is not valid JSON")
    if not isinstance(raw, dict) or not isinstance(raw.get("cmd"), str):
        return error_reply('request must be a JSON object with a "cmd" string')
    name = cast(str, raw["cmd"])
    handler = handlers.get(name)
    if handler is None:
        shown = name if len(name) <= 40 else name[:40] + "..."
        return error_reply(f"unknown command {shown!r} (known: {', '.join(sorted(handlers))})")
    problem = _check_arguments(arguments, name, raw)
    if problem:
        return error_reply(problem)
    request = cast(Request, raw)  # its command and arguments checked; the rest passes unread
    try:
        result = run(name, handler, request)
    except EdgeDaemonError as exc:
        return error_reply(str(exc))
    except Exception as exc:
        log.exception("control command %r failed", name)
        return error_reply(f"internal error: {type(exc).__name__}: {exc}")
    if not isinstance(result, dict):
        log.error("control handler %r returned %s, not a dict", name, type(result).__name__)
        return error_reply(f"internal error: handler for {name!r} returned no object")
    reply = {"ok": True, **result}
    reply["ok"] = True  # a handler cannot turn its own success into a failure reply
    return reply


def _check_arguments(arguments: dict[str, dict[str, ArgCheck]], name: str, request: JsonObject) -> str | None:
    for arg, check in arguments.get(name, {}).items():
        if arg not in request:
            return f"{name}: missing argument {arg!r}"
        problem = check(request[arg])
        if problem:
            return f"{name}: {arg!r} {problem}"
    return None


def encode(reply: Mapping[str, object]) -> bytes:
    """One reply line, newline included; NaN/inf become null."""
    try:
        text = json.dumps(reply, default=str, allow_nan=False)
    except ValueError:
        # NaN/inf (e.g. a diverged loss) is not JSON; send null rather than break strict parsers.
        try:
            text = json.dumps(_finite(reply), default=str, allow_nan=False)
        except (ValueError, TypeError, RecursionError) as exc:
            log.error("control reply cannot be encoded: %s", exc)
            text = json.dumps(error_reply(f"internal error: reply cannot be encoded: {exc}"))
    return text.encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
