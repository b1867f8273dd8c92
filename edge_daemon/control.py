"""The control socket: a Unix stream server that dispatches to the handlers it is given, and the client.

One JSON object per line each way. Request `{"cmd": "<name>", ...}`; reply `{"ok": true, ...}`
or `{"ok": false, "error": "<message>"}`. Errors are translated to replies only here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_daemon.errors import ControlError, EdgeDaemonError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]

# A request line longer than this is refused (a real request is a few dozen bytes).
MAX_REQUEST_BYTES = 64 * 1024
# A reply can carry per-channel detail; still bounded so a client never reads forever.
MAX_REPLY_BYTES = 16 * 1024 * 1024
SOCKET_MODE = 0o660


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # a stuck client must not hold the daemon at exit
    control: ControlServer


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        control = self.server.control
        self.request.settimeout(control.client_timeout_s)
        try:
            while True:
                line = self.rfile.readline(control.max_request_bytes + 1)
                if not line:
                    return
                if len(line) > control.max_request_bytes and not line.endswith(b"\n"):
                    self._send({"ok": False, "error": f"request longer than {control.max_request_bytes} bytes"})
                    return
                if not line.strip():
                    continue
                self._send(control.dispatch(line))
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("control client went away: %s", exc)

    def _send(self, reply: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
        self.wfile.flush()


class ControlServer:
    """Serves `handlers` (command name -> handler) on the Unix socket at `path`.

    A handler receives the request object and returns the reply fields; `ok` is added here.
    """

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        max_request_bytes: int = MAX_REQUEST_BYTES,
        client_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        # Kept by reference: parts built later may still add commands before start().
        self.handlers = handlers
        self.max_request_bytes = max_request_bytes
        self.client_timeout_s = client_timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Reply to one request line."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a "cmd" string'}
        name = request["cmd"]
        handler = self.handlers.get(name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r} (known: {', '.join(sorted(self.handlers))})"}
        try:
            result = handler(request)
        except EdgeDaemonError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %r failed", name)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        return {"ok": True, **result}

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ControlError(f"{self.path}: another daemon is listening on this socket")
            log.info("replacing stale control socket %s", self.path)
        # Bind under a temporary name, restrict it, then rename over the final path: clients
        # never see the socket with looser permissions, and a stale file is replaced atomically.
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        server = _Server(str(staging), _Connection, bind_and_activate=True)
        server.control = self
        os.chmod(staging, SOCKET_MODE)
        os.replace(staging, self.path)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        self.path.unlink(missing_ok=True)
        self._server = None
        log.info("control socket closed")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def request(path: Path | str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at `path` and return its reply (ok or not).

    Raises ControlError when the daemon cannot be reached or the reply is not JSON.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no daemon socket at {path} (is edge-daemon running?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (run as root or the daemon's group)") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise ControlError(f"reply from {path} exceeds {MAX_REPLY_BYTES} bytes")
        except TimeoutError:
            raise ControlError(f"the daemon at {path} did not answer within {timeout} s") from None
        except OSError as exc:
            raise ControlError(f"connection to {path} failed: {exc.strerror or exc}") from None
    try:
        reply = json.loads(bytes(buf))
    except ValueError:
        raise ControlError(f"the daemon at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} sent a reply that is not an object")
    return reply
