"""The one time format of replies, records and alerts: ISO 8601 UTC from unix seconds."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float | None, timespec: str = "seconds") -> str | None:
    """Unix seconds as ISO 8601 UTC (None stays None): the one time format of replies, to the
    second, or finer where a time names a grid step (steps may be under a second apart)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec)


def now_iso() -> str:
    """The wall clock now, as `iso` writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")
