"""The control socket file: its directory, its lock, publishing it 0660 before it is visible, and removing it only while it is ours.

The directory is created with mode 0750 if missing. A world-writable directory without the
sticky bit is refused (anyone could replace the socket with their own and answer the CLI in
the daemon's name); a world-writable sticky one (like /tmp) is accepted with a warning. A stale
socket file is replaced; a live one, or another server holding `<socket>.lock`, is an error; a
path that exists but is not a socket is refused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path
from typing import IO

from edge_daemon.errors import ControlError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
# A missing socket directory is created with this mode: group members may reach the socket, others not.
SOCKET_DIR_MODE = 0o750


class SocketFile:
    """The socket file at `path`: claimed (directory, lock, stale file), published, removed if still ours."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_file: IO[bytes] | None = None
        self._inode: tuple[int, int, int] | None = None

    def claim(self) -> None:
        """Make the path ours to bind: raises ControlError if another server has it or it is unsafe."""
        prepare_directory(self.path.parent)
        self._take_lock()
        try:
            self._replace_stale()
        except BaseException:
            self.release()
            raise

    def publish(self, listener: socket.socket, backlog: int) -> None:
        """Bind `listener` at the path, restricted to SOCKET_MODE, and listen.

        Binds under a temporary name, restricts it, listens, then renames over the final path:
        clients never see the socket with looser permissions, and a stale file is replaced
        atomically.
        """
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        try:
            listener.bind(str(staging))
            os.chmod(staging, SOCKET_MODE)
            listener.listen(backlog)
            os.replace(staging, self.path)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            raise ControlError(f"{self.path}: cannot create the control socket: {exc.strerror or exc}") from None
        self._inode = _identity(os.lstat(self.path))

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

    def release(self) -> None:
        """Drop the lock."""
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

    def owns(self) -> bool:
        """True while the file at the path is the socket we published."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return _identity(st) == self._inode

    def in_place(self) -> bool:
        """True while the path still holds our socket's inode: removed or replaced, it is gone.

        Unlike `owns`, a change of mode or group (an administrator's chmod or chgrp) keeps it in
        place: that alone must not make the daemon restart."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return self._inode is not None and stat.S_ISSOCK(st.st_mode) and _identity(st)[:2] == self._inode[:2]

    def remove(self) -> None:
        """Unlink the socket, unless it is no longer ours."""
        # A daemon started after us may own the path now; remove only our own socket.
        if self.owns():
            self.path.unlink(missing_ok=True)


def prepare_directory(directory: Path) -> None:
    """Create the socket directory if missing; refuse a world-writable one without the sticky bit."""
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


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # A freed inode number is reused at once by the next file; the change time tells them apart.
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


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
