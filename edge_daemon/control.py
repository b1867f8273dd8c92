"""The control socket: a Unix stream server that dispatches to the handlers it is given, and the client.

One JSON object per line each way. Request `{"cmd": "<name>", ...}`; reply `{"ok": true, ...}`
or `{"ok": false, "error": "<message>"}`. Errors become replies only here; a bad client never stops the server.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_daemon.errors import ControlError, DaemonUnreachable, EdgeDaemonError, PermissionDenied

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
# Checks one argument's value; returns an error message, or None when the value is acceptable.
ArgCheck = Callable[[Any], "str | None"]

# A request line longer than this is refused (a real request is a few dozen bytes).
MAX_REQUEST_BYTES = 64 * 1024
# A reply can carry per-channel detail; still bounded so a client never reads forever.
MAX_REPLY_BYTES = 16 * 1024 * 1024
SOCKET_MODE = 0o660
# A missing socket directory is created with this mode: group members may reach the socket, others not.
SOCKET_DIR_MODE = 0o750
# Client threads at once; the next connection is told "busy" and closed, so a flood costs bounded memory.
MAX_CLIENTS = 128
# A client has this long to finish each request line (and to send its next one) before it is dropped.
CLIENT_TIMEOUT_S = 10.0
# Commands that change what the daemon does; only root or the daemon's own user/group may send them.
MUTATING: frozenset[str] = frozenset({"train", "rollback"})


def positive_int(value: Any) -> str | None:
    """An integer >= 1; `true` is not 1 here, even though bool is an int subclass in Python."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a positive integer, got {type(value).__name__}"
    if value < 1:
        return f"must be a positive integer, got {value}"
    return None


# Required arguments per command (name -> check). Commands not listed take none.
ARGUMENTS: dict[str, dict[str, ArgCheck]] = {"rollback": {"version": positive_int}}

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

    Socket placement: the directory is created with mode 0750 if missing. A world-writable
    directory without the sticky bit is refused (anyone could replace the socket with their
    own and answer the CLI in the daemon's name); a world-writable sticky one (like /tmp) is
    accepted with a warning. A stale socket file is replaced; a live one, or another server
    holding `<socket>.lock`, is an error; a path that exists but is not a socket is refused.
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
        self.arguments = ARGUMENTS if arguments is None else arguments
        self.max_request_bytes = max_request_bytes
        self.client_timeout_s = client_timeout_s
        self.max_clients = max_clients
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.owner_gid = os.getegid() if owner_gid is None else owner_gid
        self._slots = threading.BoundedSemaphore(max_clients)
        self._mutating_lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._lock_file: IO[bytes] | None = None
        self._inode: tuple[int, int, int] | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        # Counters for tests and logs: connections served, refused as busy, dropped for timeout.
        self.stats = {"connections": 0, "busy": 0, "timeouts": 0}

    def _count(self, key: str) -> None:
        with self._clients_lock:
            self.stats[key] += 1

    # -- requests ----------------------------------------------------------------------------

    def dispatch(self, line: bytes, peer: Peer | None = None) -> dict[str, Any]:
        """Reply to one request line. `peer` None means a trusted in-process caller."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return {"ok": False, "error": "request is not valid UTF-8"}
        try:
            request = json.loads(text)
        except (ValueError, RecursionError):
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be a JSON object with a "cmd" string'}
        name = request["cmd"]
        handler = self.handlers.get(name)
        if handler is None:
            shown = name if len(name) <= 40 else name[:40] + "..."
            return {"ok": False, "error": f"unknown command {shown!r} (known: {', '.join(sorted(self.handlers))})"}
        problem = self._check_arguments(name, request)
        if problem:
            return {"ok": False, "error": problem}
        try:
            if name in self.mutating:
                if peer is not None and not self.may_mutate(peer):
                    raise PermissionDenied(
                        f"permission denied: {name!r} changes the daemon and needs root, uid {self.owner_uid}"
                        f" or group {self.owner_gid} (you are uid {peer.uid}, gid {peer.gid})"
                    )
                with self._mutating_lock:
                    result = handler(request)
            else:
                result = handler(request)
        except EdgeDaemonError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %r failed", name)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        if not isinstance(result, dict):
            log.error("control handler %r returned %s, not a dict", name, type(result).__name__)
            return {"ok": False, "error": f"internal error: handler for {name!r} returned no object"}
        reply: dict[str, Any] = {"ok": True}
        reply.update(result)
        reply["ok"] = True  # a handler cannot turn its own success into a failure reply
        return reply

    def _check_arguments(self, name: str, request: dict[str, Any]) -> str | None:
        for arg, check in self.arguments.get(name, {}).items():
            if arg not in request:
                return f"{name}: missing argument {arg!r}"
            problem = check(request[arg])
            if problem:
                return f"{name}: {arg!r} {problem}"
        return None

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
        directory = self.path.parent
        self._prepare_directory(directory)
        self._take_lock()
        try:
            self._replace_stale()
            # Bind under a temporary name, restrict it, listen, then rename over the final path:
            # clients never see the socket with looser permissions, and a stale file is replaced
            # atomically.
            staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            staging.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(staging))
                os.chmod(staging, SOCKET_MODE)
                listener.listen(min(self.max_clients, socket.SOMAXCONN))
                os.replace(staging, self.path)
            except OSError as exc:
                listener.close()
                staging.unlink(missing_ok=True)
                raise ControlError(f"{self.path}: cannot create the control socket: {exc.strerror or exc}") from None
        except BaseException:
            self._release_lock()
            raise
        self._inode = _identity(os.lstat(self.path))
        # A timeout lets the accept loop notice stop() without a wake-up pipe.
        listener.settimeout(0.2)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def _prepare_directory(self, directory: Path) -> None:
        if not directory.exists():
            try:
                directory.mkdir(parents=True, mode=SOCKET_DIR_MODE)
                # mkdir's mode is cut by the umask; set it exactly.
                os.chmod(directory, SOCKET_DIR_MODE)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ControlError(f"{directory}: cannot create the socket directory: {exc.strerror or exc}") from None
        mode = os.stat(directory).st_mode
        if mode & stat.S_IWOTH:
            if not mode & stat.S_ISVTX:
                raise ControlError(
                    f"{directory} is world-writable: anyone could replace the control socket; "
                    f"use a directory of mode 0750 or 0770 (e.g. /run/edge-daemon)"
                )
            log.warning("control socket directory %s is world-writable (sticky); prefer a private directory", directory)

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            # O_NOFOLLOW: a symlink planted at the lock path must not make root create files elsewhere.
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            lock_file = os.fdopen(fd, "r+b")
        except OSError as exc:
            raise ControlError(f"{lock_path}: cannot open the socket lock: {exc.strerror or exc}") from None
        try:
            # Held for the server's lifetime: two daemons started at once cannot both take the path.
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise ControlError(f"{self.path}: another daemon holds {lock_path}") from None
        self._lock_file = lock_file

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            # Closing drops the flock; the file stays, as unlinking it would race a starting daemon.
            self._lock_file.close()
            self._lock_file = None

    def _replace_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        state = _probe(self.path)
        if state == "live":
            raise ControlError(f"{self.path}: another daemon is listening on this socket")
        if state != "stale":
            raise ControlError(f"{self.path}: cannot tell whether another daemon owns this socket ({state})")
        log.info("replacing stale control socket %s", self.path)

    def stop(self) -> None:
        """Stop accepting, drop connected clients, remove the socket (if still ours)."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._owns_path():
            # Wake a blocked accept() at once instead of at its next timeout.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
                waker.settimeout(0.5)
                try:
                    waker.connect(str(self.path))
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(5.0)
        self._listener.close()
        self._listener = None
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            # Wakes client threads blocked in recv; they close their own sockets.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # A daemon started after us may own the path now; remove only our own socket.
        if self._owns_path():
            self.path.unlink(missing_ok=True)
        self._release_lock()
        log.info("control socket closed")

    def _owns_path(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return _identity(st) == self._inode

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                # EMFILE and friends: back off rather than spin; the daemon's other work goes on.
                log.warning("control socket accept failed: %s", exc)
                time.sleep(0.1)
                continue
            if self._stopping.is_set():
                conn.close()
                break
            if not self._slots.acquire(blocking=False):
                self._count("busy")
                _refuse(conn, f"busy: {self.max_clients} clients connected; try again")
                continue
            self._count("connections")
            try:
                thread = threading.Thread(target=self._serve_client, args=(conn,), name="control-client", daemon=True)
                thread.start()
            except RuntimeError:
                self._slots.release()
                _refuse(conn, "busy: cannot start a client thread")
        log.info("control accept loop exiting")

    def _serve_client(self, conn: socket.socket) -> None:
        with self._clients_lock:
            self._clients.add(conn)
        try:
            peer = peer_credentials(conn)
            for line in self._lines(conn):
                if line is None:
                    # Over the size cap: the rest of the stream cannot be trusted to resync.
                    self._send(conn, {"ok": False, "error": f"request longer than {self.max_request_bytes} bytes"})
                    return
                if not line.strip():
                    continue
                if not self._send(conn, self.dispatch(line, peer)):
                    return
        except TimeoutError:
            self._count("timeouts")
            log.debug("control client silent for %.1f s; dropped", self.client_timeout_s)
        except OSError as exc:
            log.debug("control client went away: %s", exc)
        except Exception:
            # Nothing a client sends may take the server down; log and drop this one.
            log.exception("control client failed")
        finally:
            with self._clients_lock:
                self._clients.discard(conn)
            conn.close()
            self._slots.release()

    def _lines(self, conn: socket.socket) -> Iterator[bytes | None]:
        """Yield request lines (without the newline), or None for an over-long one.

        Each line must arrive whole within client_timeout_s: a client dribbling one byte at a
        time cannot hold its thread longer than that (TimeoutError ends the connection).
        """
        buf = bytearray()
        deadline: float | None = None
        while not self._stopping.is_set():
            newline = buf.find(b"\n", 0, self.max_request_bytes + 1)
            if newline >= 0:
                line = bytes(buf[:newline])
                del buf[: newline + 1]
                yield line
                deadline = None  # the next line gets its own full allowance
                continue
            if len(buf) > self.max_request_bytes:
                yield None
                return
            if deadline is None:
                deadline = time.monotonic() + self.client_timeout_s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            chunk = conn.recv(65536)
            if not chunk:
                # EOF: a last request without a newline is still answered.
                if buf.strip() and len(buf) <= self.max_request_bytes:
                    yield bytes(buf)
                return
            buf += chunk

    def _send(self, conn: socket.socket, reply: dict[str, Any]) -> bool:
        """Send one reply line; False if the client is gone."""
        data = _encode(reply)
        try:
            # A client that stops reading gets the same deadline as one that stops writing.
            conn.settimeout(self.client_timeout_s)
            conn.sendall(data, socket.MSG_NOSIGNAL)
            return True
        except TimeoutError:
            self._count("timeouts")
            log.debug("control client stopped reading; dropped")
        except OSError as exc:  # BrokenPipeError, ConnectionResetError
            log.debug("control client vanished before its reply: %s", exc)
        return False


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # A freed inode number is reused at once by the next file; the change time tells them apart.
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _encode(reply: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(reply, default=str, allow_nan=False)
    except ValueError:
        # NaN/inf (e.g. a diverged loss) is not JSON; send null rather than break strict parsers.
        try:
            text = json.dumps(_finite(reply), default=str, allow_nan=False)
        except (ValueError, TypeError, RecursionError) as exc:
            log.error("control reply cannot be encoded: %s", exc)
            text = json.dumps({"ok": False, "error": f"internal error: reply cannot be encoded: {exc}"})
    return text.encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _refuse(conn: socket.socket, message: str) -> None:
    # Never block the accept loop on a refused client: one non-blocking send, then close.
    try:
        conn.setblocking(False)
        conn.send(_encode({"ok": False, "error": message}), socket.MSG_NOSIGNAL)
    except OSError:
        pass
    finally:
        conn.close()


def _probe(path: Path) -> str:
    """'live' if something accepts connections at `path`, 'stale' if nothing does, else the errno name."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
            return "live"
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except OSError as exc:
            # EAGAIN: the listener's backlog is full, so it is alive.
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(exc, TimeoutError):
                return "live"
            return errno.errorcode.get(exc.errno or 0, str(exc))


# -- client ------------------------------------------------------------------------------------


def request(path: Path | str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
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
