"""The control server: `ControlServer` serves a handler table on the Unix socket, built on `socketserver`.

It owns who may send what (peer credentials for mutating commands), how much a client may
cost (line size, time, number at once) and the server's start/stop.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_daemon.control import protocol
from edge_daemon.control.protocol import MAX_REQUEST_BYTES, ArgCheck, Handler, Reply, Request
from edge_daemon.control.socketfile import SocketFile
from edge_daemon.errors import PermissionDenied

log = logging.getLogger(__name__)

# Client threads at once; the next connection is told "busy" and closed, so a flood costs bounded memory.
MAX_CLIENTS = 128
# A client has this long to finish each request line (and to send its next one) before it is dropped.
CLIENT_TIMEOUT_S = 10.0
# Commands that change what the daemon does; only root or the daemon's own user/group may send them.
MUTATING: frozenset[str] = frozenset({"train", "rollback"})
# How often the serving thread looks for stop() when no connection wakes it.
_POLL_S = 0.2
# Bytes read from a client at a time.
_READ_CHUNK = 65536

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_UCRED = struct.Struct("3i")
# SO_PEERGROUPS (Linux >= 4.13) is missing from Python's socket module; its value is fixed in the kernel ABI.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    """Credentials of a connected client, as the kernel saw them at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # supplementary groups, when the kernel tells us (else empty)


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    groups: frozenset[int] = frozenset()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        # Older kernel, or more than 256 groups: judge by the primary group alone.
        pass
    return Peer(pid, uid, gid, groups)


class ControlServer:
    """Serves `handlers` (command name -> handler) on the Unix socket at `path`.

    A handler receives the request object (already checked against `arguments`) and returns
    the reply fields; `ok` is added here. Handlers run on client threads, several at once;
    mutating commands run one at a time. An EdgeDaemonError from a handler becomes
    `{"ok": false, "error": str(exc)}`; any other exception is logged and becomes
    `{"ok": false, "error": "internal error: ..."}`.

    Commands in `mutating` are served only to root, the daemon's effective uid (`owner_uid`)
    or members of its effective gid (`owner_gid`), checked with SO_PEERCRED/SO_PEERGROUPS.

    Socket placement (directory, lock, stale and live sockets) is `socketfile.SocketFile`'s.
    """

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        mutating: set[str] | frozenset[str] = MUTATING,
        arguments: dict[str, dict[str, ArgCheck]] | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
        max_clients: int = MAX_CLIENTS,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.path = Path(path)
        # Kept by reference: parts built later may still add commands before start().
        self.handlers = handlers
        self.mutating = frozenset(mutating)
        self.arguments = protocol.ARGUMENTS if arguments is None else arguments
        self.max_request_bytes = max_request_bytes
        self.client_timeout_s = client_timeout_s
        self.max_clients = max_clients
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.owner_gid = os.getegid() if owner_gid is None else owner_gid
        self._slots = threading.BoundedSemaphore(max_clients)
        self._mutating_lock = threading.Lock()
        self._stopping = threading.Event()
        self._file = SocketFile(self.path)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        # Counters for tests and logs: connections served, refused as busy, dropped for timeout.
        self.stats = {"connections": 0, "busy": 0, "timeouts": 0}

    def _count(self, key: str) -> None:
        with self._clients_lock:
            self.stats[key] += 1

    # -- requests ----------------------------------------------------------------------------

    def dispatch(self, line: bytes, peer: Peer | None = None) -> Reply:
        """Reply to one request line. `peer` None means a trusted in-process caller."""

        def run(name: str, handler: Handler, request: Request) -> Mapping[str, object]:
            if name not in self.mutating:
                return handler(request)
            if peer is not None and not self.may_mutate(peer):
                raise PermissionDenied(
                    f"permission denied: {name!r} changes the daemon and needs root, uid {self.owner_uid}"
                    f" or group {self.owner_gid} (you are uid {peer.uid}, gid {peer.gid})"
                )
            with self._mutating_lock:
                return handler(request)

        return protocol.dispatch(line, self.handlers, self.arguments, run)

    def may_mutate(self, peer: Peer) -> bool:
        return (
            peer.uid == 0
            or peer.uid == self.owner_uid
            or peer.gid == self.owner_gid
            or self.owner_gid in peer.groups
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and start serving; raises ControlError if the socket cannot be ours."""
        self._file.claim()
        server: _Server | None = None
        try:
            server = _Server(self)
            self._file.publish(server.socket, min(self.max_clients, socket.SOMAXCONN))
        except BaseException:
            if server is not None:
                server.server_close()
            self._file.release()
            raise
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(server,), name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def _serve(self, server: _Server) -> None:
        try:
            server.serve_forever(poll_interval=_POLL_S)
        except _Stopped:
            pass
        except (OSError, ValueError):
            # stop() gave up waiting and closed the socket under select(): the end it asked for.
            if not self._stopping.is_set():
                raise
        log.info("control accept loop exiting")

    def stop(self) -> None:
        """Stop accepting, drop connected clients, remove the socket (if still ours)."""
        if self._server is None:
            return
        self._stopping.set()
        if self._file.owns():
            # Wake the serving thread's select() at once instead of at its next poll.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
                waker.settimeout(0.5)
                try:
                    waker.connect(str(self.path))
                except OSError:
                    pass
        if self._thread is not None:
            # Not socketserver's shutdown(): it waits without a limit. The loop ends by itself
            # within one poll of _stopping (see _Server.service_actions).
            self._thread.join(5.0)
        self._server.server_close()
        self._server = None
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            # Wakes client threads blocked in recv; they close their own sockets.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._file.remove()
        self._file.release()
        log.info("control socket closed")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """Serving, and the file at `path` is still the socket we published.

        A socket file removed (or replaced by someone else's) leaves a server nobody can reach:
        the CLI would find nothing, or another process, at the path. Dead, so the daemon exits
        and its restart publishes the socket again.
        """
        return self.running and self._file.in_place()


    def status(self) -> None:
        """No section in `status`: a reply on the socket is the proof it serves."""
        return None


class _Stopped(Exception):
    """Ends serve_forever() from inside once stop() has been asked for."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The socketserver side of a ControlServer: admits connections and runs a thread for each."""

    # server_close() never waits for client threads: stop() must not hang on a stuck handler.
    block_on_close = False

    def __init__(self, control: ControlServer) -> None:
        # Bound and activated by SocketFile.publish, so the socket is restricted before it is visible.
        super().__init__(str(control.path), _Client, bind_and_activate=False)
        self.control = control

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if not self.control._stopping.is_set():
                # EMFILE and friends: back off rather than spin; the daemon's other work goes on.
                log.warning("control socket accept failed: %s", exc)
                time.sleep(0.1)
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        control = self.control
        if control._stopping.is_set():
            return False
        if not control._slots.acquire(blocking=False):
            control._count("busy")
            _refuse(request, f"busy: {control.max_clients} clients connected; try again")
            return False
        control._count("connections")
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            thread = threading.Thread(
                target=self.process_request_thread, args=(request, client_address), name="control-client", daemon=True
            )
            thread.start()
        except RuntimeError:
            self.control._slots.release()
            _refuse(request, "busy: cannot start a client thread")
            self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.control._slots.release()

    def service_actions(self) -> None:
        # Run by serve_forever() after each wake-up: stop() wakes it, and this ends it at once.
        if self.control._stopping.is_set():
            raise _Stopped

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Nothing a client sends may take the server down; log and drop this one.
        log.exception("control client failed")


class _LineDeadline(io.RawIOBase):
    """A client socket's read side where all the reads for one line share one deadline.

    A per-recv timeout would let a client dribbling one byte at a time hold its thread forever.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class _Client(socketserver.StreamRequestHandler):
    """One connection: request lines in, one reply line each, until EOF, a bad line or a timeout."""

    server: _Server

    def setup(self) -> None:
        super().setup()
        # StreamRequestHandler's rfile would time out per recv; a line must arrive whole in time.
        self.rfile.close()
        self.reader = _LineDeadline(self.connection)
        self.rfile = io.BufferedReader(self.reader, _READ_CHUNK)
        control = self.server.control
        with control._clients_lock:
            control._clients.add(self.connection)

    def finish(self) -> None:
        control = self.server.control
        with control._clients_lock:
            control._clients.discard(self.connection)
        super().finish()

    def handle(self) -> None:
        control = self.server.control
        try:
            peer = peer_credentials(self.connection)
            while not control._stopping.is_set():
                # Each line must arrive whole within client_timeout_s: a client dribbling one byte
                # at a time cannot hold its thread longer than that (TimeoutError ends the connection).
                self.reader.deadline = time.monotonic() + control.client_timeout_s
                line = self.rfile.readline(control.max_request_bytes + 1)
                if not line:
                    return
                if line.endswith(b"\n"):
                    line = line[:-1]
                elif len(line) > control.max_request_bytes:
                    # Over the size cap: the rest of the stream cannot be trusted to resync.
                    self._send(protocol.error_reply(f"request longer than {control.max_request_bytes} bytes"))
                    return
                # (Otherwise EOF: a last request without a newline is still answered.)
                if not line.strip():
                    continue
                if not self._send(control.dispatch(line, peer)):
                    return
        except TimeoutError:
            log.debug("control client silent for %.1f s; dropped", control.client_timeout_s)
            control._count("timeouts")  # counted once it is said: the count marks the drop as done
        except OSError as exc:
            log.debug("control client went away: %s", exc)
        except Exception:
            # Nothing a client sends may take the server down; log and drop this one.
            log.exception("control client failed")

    def _send(self, reply: Reply) -> bool:
        """Send one reply line; False if the client is gone."""
        control = self.server.control
        data = protocol.encode(reply)
        try:
            # A client that stops reading gets the same deadline as one that stops writing.
            self.connection.settimeout(control.client_timeout_s)
            self.connection.sendall(data, socket.MSG_NOSIGNAL)
            return True
        except TimeoutError:
            log.debug("control client stopped reading; dropped")
            control._count("timeouts")  # counted once it is said
        except OSError as exc:  # BrokenPipeError, ConnectionResetError
            log.debug("control client vanished before its reply: %s", exc)
        return False


def _refuse(conn: socket.socket, message: str) -> None:
    # Never block the serving thread on a refused client: one non-blocking send (the server closes it).
    try:
        conn.setblocking(False)
        conn.send(protocol.encode(protocol.error_reply(message)), socket.MSG_NOSIGNAL)
    except OSError:
        pass
