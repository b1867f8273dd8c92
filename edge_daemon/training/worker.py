"""Training workers forked from a helper that shares the daemon's imported memory.

A worker started as a fresh interpreter imports torch again (~140 MB of its
own memory, seconds of CPU) to train a model of a few MB. Instead, the daemon
forks one small helper right after its imports and before any of its threads
start; every update's worker is forked from that helper, so torch, numpy and
the daemon's code are pages the worker shares rather than copies. The helper
is single-threaded, which keeps fork safe (no lock can be held by a thread
that the child lacks). The worker raises its own OOM score so that, under a
memory limit, the kernel kills the worker and never the daemon.

Protocol (one job at a time): the daemon sends a pickled job with the write
end of a pipe (SCM_RIGHTS) over a socketpair; the helper forks the worker,
answers with its pid, waits for it and answers with its exit status. The
worker pickles its progress and result messages into the pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

# Everything a worker runs is imported here, before the helper is forked: a worker then imports
# nothing (each import would be memory of its own, not shared). numpy loads numpy.random on first
# use only (~5 MB of a worker's own when it drew the update's seed), and safetensors reaches
# numpy.ctypeslib on its first save_file, which in a daemon is the worker saving an adapter.
import numpy.ctypeslib
import numpy.random

import edge_daemon.artifacts.adapters
import edge_daemon.artifacts.base
import edge_daemon.artifacts.merge
import edge_daemon.artifacts.traces
import edge_daemon.baselines
import edge_daemon.training.pretrain
import edge_daemon.store
import edge_daemon.training.loop
import edge_daemon.training.lora  # noqa: F401  (with numpy.random and the others above)
from edge_daemon.memory.pressure import SharedLevel
from edge_daemon.memory.usage import tight_malloc

log = logging.getLogger(__name__)

# Linux prctl(2): deliver a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1
# The largest job message (config and governor state are a few kB).
MAX_JOB_BYTES = 1 << 20
# The worker's /proc/self/oom_score_adj: first in line for the OOM killer (the range is -1000..1000).
WORKER_OOM_SCORE_ADJ = 1000


class SharedFlag:
    """A yes/no in shared memory (the daemon's "stop" to a worker); set and read without locks."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context("fork").RawValue(ctypes.c_int, 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended: its exit code, or the signal that killed it."""

    pid: int
    code: int | None
    signal: int | None

    @classmethod
    def of(cls, pid: int, status: int) -> WorkerExit:
        if os.WIFSIGNALED(status):
            return cls(pid, None, os.WTERMSIG(status))
        return cls(pid, os.waitstatus_to_exitcode(status), None)

    def describe(self) -> str:
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            hint = " (out of memory?)" if self.signal == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exited with code {self.code}"


def _parent_death_signal(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux; else nothing)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _close_inherited_fds(keep: set[int]) -> None:
    """Close what the helper inherited beyond `keep`: sockets and pipes of the daemon's embedder
    (a test process, say) must not be held open by a process that never uses them."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _log_stream_fds() -> set[int]:
    """File descriptors the logging handlers write to (kept open in the helper and its workers)."""
    fds: set[int] = set()
    for logger in [logging.getLogger(), *[lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]]:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            with contextlib.suppress(AttributeError, OSError, ValueError):
                fds.add(stream.fileno())  # type: ignore[union-attr]
    return fds


class MessageWriter:
    """The worker's end of its pipe: each message one pickle."""

    def __init__(self, fd: int) -> None:
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._lock = threading.Lock()  # the update trace's sampler thread does not write, but keep writes whole

    def put(self, message: Any) -> None:
        with self._lock:
            pickle.dump(message, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def read_messages(fd: int) -> Iterator[Any]:
    """The daemon's end: every message the worker wrote, until it closes its end or dies.

    A worker killed mid-write leaves half a pickle: that ends the stream like EOF."""
    with os.fdopen(fd, "rb") as stream:
        while True:
            try:
                message = pickle.load(stream)
            except (EOFError, pickle.UnpicklingError, ValueError, OSError):
                return
            yield message


# A worker's entry point: (the job it was forked for, its message pipe, the shared level, the stop flag).
WorkerMain = Callable[[Any, MessageWriter, SharedLevel, SharedFlag], None]


class WorkerForker:
    """The helper process and the daemon's handle on it.

    `start()` must run before the daemon starts any thread. `launch(job, target)`
    forks a worker running `target(job, writer, level, stop)` and returns its pid
    and the read end of its message pipe; `wait()` returns how it exited.
    """

    def __init__(self) -> None:
        # Shared memory made before the fork, so the helper and its workers inherit it.
        self.level = SharedLevel(multiprocessing.get_context("fork"))
        self.stop_flag = SharedFlag()
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._targets: dict[str, WorkerMain] = {}

    def register(self, name: str, target: WorkerMain) -> None:
        """Make `target` runnable by name in workers (registered before `start()`: the helper knows
        only what existed when it was forked)."""
        if self.pid is not None:
            raise RuntimeError("register worker entry points before start()")
        self._targets[name] = target

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            pid, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def start(self) -> None:
        if threading.active_count() > 1:
            # Forking now is still safe for what the helper does (it takes no lock the threads
            # hold), but say so: the daemon itself forks before its threads start.
            log.debug("forking the training helper with %d threads running", threading.active_count())
        # Freeze what exists: the helper's and workers' collections then never write to these
        # objects' headers, which would copy the pages they sit on.
        gc.freeze()
        daemon_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                daemon_end.close()
                _helper_main(helper_end, self._targets, self.level, self.stop_flag)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        # The daemon keeps them frozen too: a full collection would write to every one of them and
        # so copy, page by page, what the helper still shares (until `stop()`).
        helper_end.close()
        self.pid = pid
        self._sock = daemon_end
        log.info("training helper forked (pid %d)", pid)

    def launch(self, target: str, job: Any) -> tuple[int, int]:
        """Fork a worker running the registered `target` on `job`; returns (pid, message fd)."""
        if target not in self._targets:
            raise KeyError(f"no worker entry point {target!r}")
        payload = pickle.dumps((target, job), protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_JOB_BYTES:
            raise ValueError(f"job message of {len(payload)} bytes exceeds {MAX_JOB_BYTES}")
        read_fd, write_fd = os.pipe()
        try:
            with self._lock:
                if self._sock is None:
                    raise RuntimeError("the training helper is not running")
                socket.send_fds(self._sock, [payload], [write_fd])
                reply = self._sock.recv(4096)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        if not reply:
            os.close(read_fd)
            raise RuntimeError("the training helper exited")
        return int(pickle.loads(reply)["pid"]), read_fd

    def wait(self) -> WorkerExit | None:
        """How the last launched worker exited (blocks until it has); None if the helper is gone."""
        with self._lock:
            if self._sock is None:
                return None
            reply = self._sock.recv(4096)
        if not reply:
            return None
        message = pickle.loads(reply)
        return WorkerExit.of(int(message["pid"]), int(message["status"]))

    def stop(self, timeout: float = 10.0) -> None:
        """Close the helper's socket (it exits once its worker has) and reap it."""
        sock, self._sock = self._sock, None
        if self.pid is not None:
            gc.unfreeze()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self.pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid = self.pid  # already reaped
            if pid:
                self.pid = None
                return
            time.sleep(0.05)
        log.warning("training helper did not exit within %.0f s; killing it", timeout)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pid = None


def _helper_main(sock: socket.socket, targets: dict[str, WorkerMain], level: SharedLevel, stop_flag: SharedFlag) -> None:
    """The helper's loop: one job, one worker, one exit status at a time, until the daemon closes."""
    daemon_pid = os.getppid()
    _parent_death_signal(signal.SIGKILL)
    if os.getppid() != daemon_pid:  # the daemon died before the request took effect
        return
    # The daemon's handlers belong to the daemon; Ctrl-C in a terminal reaches the whole group and
    # the daemon decides when training stops.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _close_inherited_fds({0, 1, 2, sock.fileno(), *_log_stream_fds()})
    while True:
        try:
            payload, fds, _flags, _addr = socket.recv_fds(sock, MAX_JOB_BYTES, 1)
        except OSError:
            return
        if not payload:
            return  # the daemon closed its end
        target, job = pickle.loads(payload)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                sock.close()
                _worker_setup()
                targets[target](job, MessageWriter(fds[0]), level, stop_flag)
            except BaseException:
                logging.getLogger(__name__).exception("training worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.send(pickle.dumps({"pid": pid}))
        _pid, status = os.waitpid(pid, 0)
        try:
            sock.send(pickle.dumps({"pid": pid, "status": status}))
        except OSError:
            return


def _worker_setup() -> None:
    """Lower the worker's claim on the device: OOM-killed first, lower CPU and I/O priority."""
    helper_pid = os.getppid()
    _parent_death_signal(signal.SIGKILL)
    if os.getppid() != helper_pid:
        os._exit(1)
    tight_malloc()  # the daemon set it before the fork; set again where a worker is forked by another program
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(WORKER_OOM_SCORE_ADJ))
    except OSError as exc:  # raising one's own score needs no privilege; report if it fails anyway
        log.warning("could not raise the training worker's OOM score: %s", exc)


__all__ = ["MessageWriter", "SharedFlag", "WorkerExit", "WorkerForker", "read_messages"]
