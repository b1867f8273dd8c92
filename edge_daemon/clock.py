"""Whether the device clock can be trusted: the kernel's synchronisation state and clock jumps.

A device without a real-time clock boots with the time of its last shutdown (or 1970) and runs
on it until NTP steps the clock. Readings stamped by sensors with good clocks then look "future"
or "too old" to the device; the ingestor holds them (see store's `held` table) while this says
the clock is not trusted, instead of rejecting them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from edge_daemon.control.replies import ClockStatus

log = logging.getLogger(__name__)

# The clock is synchronised while the kernel's maximum error estimate (`maxerror` of adjtimex(2),
# which NTP daemons keep small and the kernel grows by 0.5 ms a second without them) is under
# 16 s: systemd's rule (timedatectl's "System clock synchronized"). It ignores STA_UNSYNC, which
# chrony sets on purpose to keep the kernel from writing the RTC.
MAX_ERROR_US = 16_000_000
# A change of this much between the wall clock and the monotonic clock is a jump (a step by NTP
# or by hand, or a resume from suspend), not NTP's slewing (at most 0.5 ms per second).
JUMP_S = 1.0
# The kernel is asked at most this often.
KERNEL_POLL_S = 1.0

Trust = Literal["kernel", "always", "never"]


class _Timex(ctypes.Structure):
    """The head of `struct timex` (C `long` fields, as the plain `adjtimex` symbol takes them),
    padded well past the kernel's whole struct (208 bytes on 64-bit Linux)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_char * 512),
    ]


def _adjtimex() -> Callable[[ctypes._Pointer[_Timex]], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.adjtimex  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_ADJTIMEX = _adjtimex()


def kernel_synchronized() -> bool | None:
    """True if the kernel says its clock is synchronised (NTP), False if it says it is not,
    None where it cannot be asked (no adjtimex: not Linux, or a sandbox that forbids it)."""
    if _ADJTIMEX is None:
        return None
    timex = _Timex()  # zeroed: modes = 0 only reads, and needs no privilege
    if _ADJTIMEX(ctypes.byref(timex)) < 0:  # type: ignore[arg-type]
        return None
    return bool(timex.maxerror < MAX_ERROR_US)


class ClockWatch:
    """Tracks whether the wall clock is trusted and counts its jumps.

    `trust`: "kernel" trusts the clock while the kernel says it is synchronised (and where the
    kernel cannot be asked); "always" trusts it (readings outside the time window are rejected at
    once, as before holding existed); "never" never trusts it (readings outside the window are
    held until they fit it or the hold times out).
    """

    def __init__(
        self,
        trust: Trust = "kernel",
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        synchronized: Callable[[], bool | None] = kernel_synchronized,
    ) -> None:
        self.trust = trust
        self.wall = wall
        self.mono = mono
        self._synchronized_fn = synchronized
        self._lock = threading.Lock()
        self._offset = wall() - mono()
        self._asked_at = -float("inf")
        self.synchronized: bool | None = None
        self.jumps = 0
        self.last_jump_s: float | None = None  # signed: > 0 the clock went forward
        # Called with each jump's size (in the polling thread, after the poll): what keeps
        # time by the wall clock (apscheduler's interval triggers) must be told.
        self.on_jump: list[Callable[[float], None]] = []
        self.trusted = self._judge()

    def _judge(self) -> bool:
        if self.trust == "always":
            return True
        if self.trust == "never":
            return False
        now = self.mono()
        if now - self._asked_at >= KERNEL_POLL_S:
            self._asked_at = now
            self.synchronized = self._synchronized_fn()
        return self.synchronized is not False

    def poll(self) -> bool:
        """Look at the clocks again; True if the clock jumped or its trust changed since the last poll."""
        with self._lock:
            offset = self.wall() - self.mono()
            jumped = abs(offset - self._offset) > JUMP_S
            if jumped:
                self.jumps += 1
                self.last_jump_s = offset - self._offset
                log.warning("the wall clock jumped by %+.1f s", self.last_jump_s)
            self._offset = offset
            was = self.trusted
            self.trusted = self._judge()
            if self.trusted != was:
                log.warning("the wall clock is %s", "trusted again" if self.trusted else "not synchronised: out-of-window readings are held")
            changed = jumped or self.trusted != was
            jump = self.last_jump_s
        if jumped:
            assert jump is not None
            for hook in self.on_jump:
                try:
                    hook(jump)
                except Exception:
                    log.exception("clock jump hook %r failed", hook)
        return changed

    def status(self) -> ClockStatus:
        with self._lock:
            return {
                "trust": self.trust,
                "synchronized": self.synchronized,
                "trusted": self.trusted,
                "jumps": self.jumps,
                "last_jump_s": None if self.last_jump_s is None else round(self.last_jump_s, 3),
            }
