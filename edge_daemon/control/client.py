"""The control client: one request to the daemon's socket and its reply, as the CLI sends it."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from edge_daemon.control.protocol import MAX_REPLY_BYTES, JsonObject
from edge_daemon.errors import ControlError, DaemonUnreachable


def _is_socket(path: Path | str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # gone meanwhile: say what connect() said


def request(path: Path | str, payload: JsonObject, timeout: float = 10.0) -> JsonObject:
    """Send one request to the daemon at `path` and return its reply (ok or not).

    Raises DaemonUnreachable when nothing answers at `path` (no socket, refused, no
    permission, timeout) and ControlError when the reply is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonUnreachable(f"no daemon socket at {path}", cause="missing") from None
        except PermissionError:
            raise DaemonUnreachable(f"permission denied on {path}", cause="permission") from None
        except ConnectionRefusedError:
            # connect() on a path that is not a socket (a regular file, say) is refused as well.
            if not _is_socket(path):
                raise DaemonUnreachable(f"{path} is not a socket: is this the daemon's control socket path?", cause="not_socket") from None
            raise DaemonUnreachable(f"nothing is listening on {path} (stale socket)", cause="refused") from None
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon at {path} did not accept within {timeout} s", cause="timeout") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot reach the daemon at {path}: {exc.strerror or exc}", cause="other") from None
        buf = bytearray()
        try:
            try:
                sock.sendall(json.dumps(payload).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered and closed before reading (e.g. "busy"): read that reply.
                pass
            deadline = time.monotonic() + timeout
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise ControlError(f"reply from {path} exceeds {MAX_REPLY_BYTES} bytes")
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon at {path} did not answer within {timeout} s", cause="timeout") from None
        except OSError as exc:
            raise DaemonUnreachable(f"connection to {path} failed: {exc.strerror or exc}", cause="other") from None
    if not buf:
        raise ControlError(f"the daemon at {path} closed the connection without a reply")
    try:
        reply = json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"the daemon at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} sent a reply that is not an object")
    return reply
