"""Logging set-up: journald-friendly lines under systemd, timestamped lines on a terminal.

Under journald every line carries a `<N>` syslog priority prefix
(sd-daemon(3)) and no timestamp, because journald stamps each entry itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon.h: SD_EMERG "<0>" .. SD_DEBUG "<7>"; journald strips the prefix
# and files the line under that priority (`journalctl -p err` works).
SD_CRIT = 2
SD_ERR = 3
SD_WARNING = 4
SD_NOTICE = 5
SD_INFO = 6
SD_DEBUG = 7

TERMINAL_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

# Marks the handler this module installed, so a second call replaces it
# instead of printing every line twice.
_HANDLER_NAME = "edge-daemon"


def syslog_priority(levelno: int) -> int:
    """The sd-daemon priority for a logging level (custom levels round down to the nearest)."""
    if levelno >= logging.CRITICAL:
        return SD_CRIT
    if levelno >= logging.ERROR:
        return SD_ERR
    if levelno >= logging.WARNING:
        return SD_WARNING
    if levelno >= logging.INFO:
        return SD_INFO
    return SD_DEBUG


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, with the prefix on every line of a multi-line record.

    journald splits a stream on newlines and reads a priority per line; an
    unprefixed traceback line would be filed as info, so `journalctl -p err`
    would show the error without its traceback.
    """

    def __init__(self, fmt: str = JOURNAL_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is connected to journald.

    systemd sets JOURNAL_STREAM="<device>:<inode>" of the stream it connects;
    comparing it with the fd's own device and inode (as systemd.exec(5)
    advises) tells a journald stream from a terminal, a file or a pipe that a
    child inherited the variable into.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # No real fd (pytest capture, io.StringIO) or a malformed variable.
        return False


def setup_logging(level: str = "INFO", journald: bool | None = None, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once for the whole process.

    `journald=None` detects it (JOURNAL_STREAM matches stderr); True or False
    forces a format. Calling again replaces the handler this function
    installed earlier. Returns that handler.
    """
    stream = sys.stderr if stream is None else stream
    if journald is None:
        journald = stderr_is_journal(stream)
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JournalFormatter() if journald else logging.Formatter(TERMINAL_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
