"""SQLite replay store: batched writes, held readings, retention, replay sampling.

Readings are keyed by time first, then channel (one integer: ts in microseconds x 1024 + channel
id), so a redelivered MQTT message is stored once and a commit appends to the newest pages of
the file whatever the channel count (few bytes written per reading: SD cards). The file is
kept under a byte budget: recent readings are kept whole, older ones as a uniform reservoir of
whole time segments, so older regimes survive for replay in a small file.

Over 400 lines on purpose: it is one class over one SQLite file, and every method shares its
connection discipline (one writer connection behind a lock, short-lived readers, IMMEDIATE
transactions) and the segment table that writes, retention and replay sampling keep
consistent. The schema and its migrations are in store_schema.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import sqlite_utils

from edge_daemon.artifacts.files import fsync_path
from edge_daemon.config import StoreConfig
from edge_daemon.errors import DiskFullError, StoreError, StoreReplacedError
from edge_daemon.store_schema import (
    CHANNEL_BITS,
    CHANNEL_MASK,
    LEGACY_READINGS,
    MIGRATIONS,
    adopt_legacy_record,
    migration_set,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Retention starts trimming when the data pages pass HIGH_WATER of the budget and trims down to
# LOW_WATER, so the file has room to grow (and the WAL to fill) between two retention runs.
HIGH_WATER = 0.85
LOW_WATER = 0.75
# Share of the budget the WAL may reach before SQLite checkpoints it back into the database.
WAL_SHARE = 0.05
# SQLite's page cache per connection, in KiB. Its default (2,000 KiB) is heap memory each
# connection keeps for its life: the writer and the pooled readers together filled ~7.5 MB over
# a store's first days and never gave it back. Reads are key-range scans that the kernel's page
# cache (reclaimable, unlike the heap) serves as well, and the writer appends to the newest pages.
WRITER_CACHE_KIB = 512
READER_CACHE_KIB = 256


def is_disk_full(exc: BaseException) -> bool:
    """Whether an SQLite or OS error says the file system is out of space."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return getattr(exc, "sqlite_errorname", None) == "SQLITE_FULL" or "disk is full" in str(exc)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Reading(NamedTuple):
    channel: str  # '<sensor>/<channel>'
    ts: float  # unix seconds
    value: float


def segment_of(ts: float, segment_s: float) -> int:
    """Index of the segment [k * segment_s, (k + 1) * segment_s) that holds ts.

    Corrected after the division so it agrees exactly with the range comparisons SQL uses when
    it deletes or reads a segment.
    """
    k = math.floor(ts / segment_s)
    if k * segment_s > ts:
        k -= 1
    elif (k + 1) * segment_s <= ts:
        k += 1
    return k


# Page size of a new store. A commit writes whole pages to the WAL (and a checkpoint writes them
# again to the file): small pages keep a commit's few partly filled ones small. Measured with
# `benchmarks/ingest.py --wear`; an existing store keeps the page size it was made with.
NEW_STORE_PAGE_SIZE = 1024
# Readings the move from the (channel_id, ts) table of a store made before 0003 takes per
# transaction: each chunk commits on its own, so a move killed midway resumes where it stopped.
LEGACY_CHUNK = 50_000
# The lowest and highest sample keys, for reads without a bound.
_KEY_MIN, _KEY_MAX = -(1 << 63), (1 << 63) - 1


def sample_keys(ts: np.ndarray, channel_ids: np.ndarray) -> np.ndarray:
    """The keys of readings stamped `ts` (unix seconds, kept to the microsecond, half up) on
    `channel_ids`: ts in microseconds shifted left by CHANNEL_BITS, plus the channel id."""
    micros = np.floor(np.asarray(ts, dtype=np.float64) * 1e6 + 0.5).astype(np.int64)
    return (micros << CHANNEL_BITS) | np.asarray(channel_ids, dtype=np.int64)


def stored_ts(ts: float) -> float:
    """The timestamp the store keeps of `ts`: unix seconds to the microsecond, half up."""
    return float(decode_keys(sample_keys(np.asarray([ts]), np.zeros(1, dtype=np.int64)))[0][0])


def key_bound(ts: float | None, default: int) -> int:
    """The first key at or after `ts` (None or an infinity: `default`): the keys of readings
    with ts >= x are exactly those >= key_bound(x), and of those with ts < x, those below it."""
    if ts is None or not math.isfinite(ts):
        return default
    return math.ceil(ts * 1e6) << CHANNEL_BITS


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ts float64 unix seconds, channel id int64) of sample keys."""
    keys = np.asarray(keys, dtype=np.int64)
    return (keys >> CHANNEL_BITS) / 1e6, keys & CHANNEL_MASK


# Rows per INSERT statement: 2 parameters each stays under 999, the variable limit of SQLite
# builds before 3.32. One multi-row statement is one sqlite3_step: executemany binds and steps
# row by row, releasing and retaking the GIL each time, which starves the MQTT network thread.
INSERT_CHUNK = 256
_insert_sql: dict[int, str] = {}


def _insert_readings(conn: sqlite3.Connection, flat: list[int | float]) -> None:
    """INSERT OR IGNORE the rows in `flat` (key, value, key, ...) into `samples`.

    Chunks are powers of two up to INSERT_CHUNK rows, so a handful of distinct statements
    cover every batch size and stay in the connection's prepared-statement cache.
    """
    rows = len(flat) // 2
    start = 0
    while rows:
        k = INSERT_CHUNK if rows >= INSERT_CHUNK else 1 << (rows.bit_length() - 1)
        sql = _insert_sql.get(k)
        if sql is None:
            values = ",".join(["(?,?)"] * k)
            sql = _insert_sql[k] = f"INSERT OR IGNORE INTO samples (key, value) VALUES {values}"
        conn.execute(sql, flat[start : start + 2 * k])
        start += 2 * k
        rows -= k


def _damaged_order(path: Path, moved: Path) -> tuple[str, int]:
    """(UTC time, count within that second) of a store moved aside from `path`."""
    stamp, _, n = moved.name.removeprefix(f"{path.name}.corrupt-").partition("-")
    return stamp, int(n) if n.isdigit() else 1


def damaged_stores(path: Path) -> list[Path]:
    """The damaged stores `check_store` moved aside from `path`, oldest first."""
    found = [p for p in path.parent.glob(f"{path.name}.corrupt-*") if not p.name.endswith("-wal")]
    return sorted(found, key=lambda p: _damaged_order(path, p))


class StoreCheck(NamedTuple):
    """What a check of the store found: `problem` is None for an intact store (or none yet)."""

    seconds: float  # PRAGMA quick_check's time (0: no store yet)
    problem: str | None  # what quick_check or SQLite said of a damaged store
    moved_to: Path | None  # where the damaged store went (None: it was intact)
    checked_unix: float
    cause: str = "start"  # why it was checked: "start", "scheduled", or the SQLite error met while running


CORRUPT_KEEP = 2  # damaged stores kept for inspection, the newest: a card that keeps corrupting must not fill up
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
# The I/O errors (extended codes) of a file the card cannot read back: a plain SQLITE_IOERR, a
# failed or short read, the file system's own damage. Not those of a full disk (fsync, the
# shared-memory index), of memory or of locks: those are retried, never called damage.
_READ_ERRORS = (10, 266, 522, 8458)  # SQLITE_IOERR, _READ, _SHORT_READ, _CORRUPTFS


def _code(exc: BaseException) -> int:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def calls_for_check(exc: BaseException) -> bool:
    """Whether an SQLite error met while running says the store may be damaged: SQLite calls
    it corrupt or not a database, or the file cannot be read back."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    return _code(exc) in _CORRUPT_CODES or getattr(exc, "sqlite_errorcode", 0) in _READ_ERRORS


def quick_check(conn: sqlite3.Connection) -> str | None:
    """`PRAGMA quick_check` on `conn`: None when intact, else one line for the status and the
    alert. SQLite calling the file corrupt or not a database is an answer too; any other
    error (a lock, a permission) is raised."""
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if not calls_for_check(exc):  # an unreadable page is damage too
            raise
        return str(exc)
    if [tuple(r) for r in rows] == [("ok",)]:
        return None
    # The first complaints, whitespace folded.
    problem = "; ".join(" ".join(str(r[0]).replace("*** in database main ***", "").split()) for r in rows[:2])
    problem = (problem[:200] + "...") if len(problem) > 200 else problem
    return problem + (f" ({len(rows)} problems)" if len(rows) > 2 else "")


def move_aside(path: Path, problem: str, now: float) -> Path:
    """Move the damaged store `path` (and its WAL) aside as `<name>.corrupt-<UTC time>` for
    inspection, keeping the newest CORRUPT_KEEP; returns where it went. No connection to it
    may be open."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    # Damaged again within the second: counted on from the last one moved aside then.
    n = max((k for t, k in (_damaged_order(path, p) for p in damaged_stores(path)) if t == stamp), default=0) + 1
    moved = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n > 1 else ""))
    for suffix in ("", "-wal"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{moved}{suffix}")
    Path(f"{path}-shm").unlink(missing_ok=True)  # an index of the WAL, rebuilt by SQLite
    fsync_path(path.parent)
    for old in damaged_stores(path)[:-CORRUPT_KEEP]:
        for suffix in ("", "-wal"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
        log.warning("removed %s, an older damaged store (the newest %d are kept)", old.name, CORRUPT_KEEP)
    log.error("replay store %s is damaged (%s): moved aside to %s; a new store starts", path, problem, moved.name)
    return moved


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to drop the store file's clean pages from the page cache. A check reads
    the whole file: left cached, a second read (the next check, a restart's) marks those pages
    active, and the service's cgroup charge (less inactive page cache: what the memory watchdog
    reads) would carry the store's size until the kernel needs the room."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_store(path: Path, busy_timeout_s: float = 30.0, cause: str = "start") -> StoreCheck:
    """Check an existing store with `PRAGMA quick_check` (its WAL included) before it is opened.

    A damaged one (quick_check's complaints, or SQLite calling the file corrupt or not a
    database) is moved aside (`move_aside`), so that a new store starts in its place: a damaged
    file is a state the daemon reports, not one it cannot start from. Any other error (a lock,
    a permission) is the caller's, as opening the store would be: nothing is moved then."""
    path = Path(path)
    now = time.time()
    if not path.exists():
        return StoreCheck(0.0, None, None, now, cause)
    started = time.monotonic()
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
        try:
            problem = quick_check(conn)
        finally:
            conn.close()
            drop_cached_pages(path)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot check the replay store: {exc}") from exc
    seconds = time.monotonic() - started
    try:
        moved = None if problem is None else move_aside(path, problem, now)
    except OSError as exc:  # a card remounted read-only, say
        raise StoreError(f"{path}: damaged ({problem}) and cannot be moved aside: {exc}") from exc
    return StoreCheck(seconds, problem, moved, now, cause)


def _recovers(method: Callable[..., T]) -> Callable[..., T]:
    """A ReplayStore method after which an SQLite error that calls for a check (damage, an I/O
    error) checks the store and, if it is damaged, replaces it (`ReplayStore.recover`)."""

    @functools.wraps(method)
    def checked(self: ReplayStore, *args: object, **kwargs: object) -> T:
        generation = self._generation
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, StoreError) as exc:
            error = exc.__cause__ if isinstance(exc, StoreError) else exc
            if isinstance(exc, StoreReplacedError) or error is None or not calls_for_check(error):
                raise
            if not self.recovers:
                raise StoreError(f"{self.path}: {error} (the store may be damaged: the daemon checks it)") from exc
            if self.recover(str(error), generation).moved_to is not None:
                raise StoreReplacedError(f"{self.path}: the store was damaged ({error}) and replaced by a new one") from exc
            raise

    return checked


class ReplayStore:
    """The replay store in `path` (created if missing).

    Thread use: one writer thread calls `write` (and retention may run in another thread: writes
    are serialised by a lock); any thread may read, each on its own connection.
    """

    def __init__(
        self,
        path: Path,
        cfg: StoreConfig,
        channels: list[str],
        seed: int | None = None,
        progress: Callable[[str], None] | None = None,
        recovers: bool = False,
    ) -> None:
        """`progress` is told what a long open does (the move of an older store's readings), a
        line at a time, for the service manager. `recovers`: this instance replaces the file when
        it meets damage (`recover`); only the daemon's may, as moving the file aside from under
        it would send its acknowledged readings to the file moved aside. Any other process's
        store (a training worker's, the report's) raises the error and leaves it to the daemon."""
        self.path = Path(path)
        self._progress = progress
        self.recovers = recovers
        self.cfg = cfg
        self.channels = list(channels)
        self._rng = np.random.default_rng(seed)
        # Reentrant: a method holding it may meet damage and replace the store (`recover`).
        self._write_lock = threading.RLock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._generation = 0  # counts the files opened: a reader lent out before a replacement is closed on return
        self._recovering = False  # a replacement is under way: readers wait for it (`_readers_changed`)
        self._readers_changed = threading.Condition(self._readers_lock)
        self._broken: str | None = None  # why the file could not be opened again after a check
        self._checking = False  # a scheduled check holds a snapshot: retention does not wait to checkpoint
        # Damaged stores replaced while running (`recover`), oldest first, and what is called
        # with each (outside the store's locks).
        self.replaced: list[StoreCheck] = []
        self.on_replaced: list[Callable[[StoreCheck], None]] = []
        self.last_check: StoreCheck | None = None  # the newest check made while running
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        """Open (or create) the file at `path`: the writer connection, migrations, the segment
        table, the channel ids and the hold's count."""
        try:
            self._conn = self._connect(writer=True)
            self._db = sqlite_utils.Database(self._conn)
            self._migrate()
            moved = self._move_legacy_readings()
            self._segment_s = self._check_segment_size(recount=moved)
            self._channel_ids: dict[str, int] = {
                name: int(cid) for cid, name in self._conn.execute("SELECT id, name FROM channels")
            }
            self._held_rows = 0
            self._held_span: tuple[float, float] | None = None
            self._count_held()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open replay store: {exc}") from exc

    # -- connections -------------------------------------------------------------------------

    def _connect(self, writer: bool) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        if writer:
            # Both must precede the first table (on an existing store they change nothing).
            conn.execute(f"PRAGMA page_size = {NEW_STORE_PAGE_SIZE}")
            # Lets retention hand freed pages back to the file
            # system with `incremental_vacuum` instead of a full VACUUM every time.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # WAL: readers (status, trainer) never block the ingest writer, nor it them, and a commit
        # is one sequential append instead of a rollback-journal rewrite.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        # FULL fsyncs the WAL at every commit: a QoS 1 message is acknowledged only after its
        # batch commits, so the commit must survive power loss too, not only a process crash.
        # NORMAL keeps process-crash safety and only risks the last commits on power loss.
        conn.execute(f"PRAGMA synchronous = {self.cfg.synchronous.upper()}")
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB if writer else READER_CACHE_KIB}")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        wal_pages = max(16, min(1000, int(self.cfg.budget_mb * 1024 * 1024 * WAL_SHARE / page_size)))
        # The WAL counts against the byte budget: checkpoint it after a small share of the
        # budget (SQLite's default is 1000 pages, 4 MB, more than a small budget allows) and
        # truncate it back to that size after each checkpoint instead of keeping its high-water mark.
        conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit = {wal_pages * page_size}")
        return conn

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A reader connection from a small pool: threads come and go (one per control client),
        so connections are lent out per call rather than kept per thread."""
        with self._readers_lock:
            # Not while the store is being replaced: a reader opened then would read the file
            # moved aside (or make an empty one where the new store goes).
            self._readers_changed.wait_for(lambda: not self._recovering)
            if self._closed:
                raise StoreError("replay store is closed")
            if self._broken is not None:
                raise StoreError(f"{self.path}: replay store unavailable: {self._broken}")
            conn = self._idle_readers.pop() if self._idle_readers else None
            generation = self._generation
        if conn is None:
            conn = self._connect(writer=False)
        try:
            yield conn
        finally:
            with self._readers_lock:
                if self._closed or generation != self._generation or len(self._idle_readers) >= 4:
                    conn.close()
                else:
                    self._idle_readers.append(conn)

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # SQLite rolls some failures back itself (a full disk mid-statement): a ROLLBACK then
            # would fail and hide the real error. A failed COMMIT may leave the transaction open.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    # -- schema ------------------------------------------------------------------------------

    def _migrate(self) -> None:
        migrations = migration_set()
        with self._write_lock:
            adopt_legacy_record(self._db, migrations)
            applied = [m.name for m in migrations.applied(self._db)]
            unknown = set(applied) - {name for name, _ in MIGRATIONS}
            if unknown:
                raise StoreError(f"{self.path}: written by a newer version (migrations {sorted(unknown)})")
            pending = [m.name for m in migrations.pending(self._db)]
            migrations.apply(self._db)
        for name in pending:
            log.info("store %s: applied migration %s", self.path, name)

    def migrations(self) -> list[str]:
        """Names of the applied migrations, in the order they were applied."""
        with self._reader() as conn:
            return [m.name for m in migration_set().applied(sqlite_utils.Database(conn))]

    def _move_legacy_readings(self) -> bool:
        """Move the rows of a store made before 0003 from its (channel_id, ts) table into
        `samples`, oldest first, a time window of about LEGACY_CHUNK readings at a time, each in
        a transaction of its own: the new rows append to the time-keyed table (its pages filled
        whole), and the rows deleted from the old table free the pages the next window takes,
        so the file does not grow by more than a window. A move killed midway resumes at the
        next open. Returns whether there was anything to move."""
        conn = self._conn
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (LEGACY_READINGS,)).fetchone():
            return False
        started = time.monotonic()
        moved = 0
        ids = [int(cid) for (cid,) in conn.execute("SELECT id FROM channels")]
        if ids and max(ids) > CHANNEL_MASK:
            raise StoreError(f"{self.path}: channel id {max(ids)} is above {CHANNEL_MASK}")
        with self._write_lock:
            while True:
                # Each a descent of the old key per channel: no scan of the table.
                bounds = [
                    conn.execute(f"SELECT MIN(ts), MAX(ts) FROM {LEGACY_READINGS} WHERE channel_id = ?", (cid,)).fetchone()
                    for cid in ids
                ]
                bounds = [b for b in bounds if b[0] is not None]
                if not bounds:
                    conn.execute(f"DROP TABLE {LEGACY_READINGS}")
                    break
                low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
                rows_left = int(conn.execute("SELECT COALESCE(SUM(rows), 0) FROM segments").fetchone()[0]) - moved
                window = max(1e-3, LEGACY_CHUNK * (high - low + 1.0) / max(1, rows_left))
                t = low
                while t <= high:
                    with self._transaction(conn):
                        rows = []
                        for cid in ids:
                            rows += conn.execute(
                                f"SELECT channel_id, ts, value FROM {LEGACY_READINGS} WHERE channel_id = ? AND ts >= ? AND ts < ?",
                                (cid, t, t + window),
                            ).fetchall()
                        if rows:
                            cids, stamps, values = zip(*rows)
                            keys = sample_keys(np.asarray(stamps), np.asarray(cids))
                            order = np.argsort(keys, kind="stable")
                            _insert_readings(conn, list(chain.from_iterable(zip(keys[order].tolist(), np.asarray(values)[order].tolist()))))
                            for cid in ids:
                                conn.execute(
                                    f"DELETE FROM {LEGACY_READINGS} WHERE channel_id = ? AND ts >= ? AND ts < ?", (cid, t, t + window)
                                )
                    t += window
                    if rows:
                        moved += len(rows)
                        log.info("store %s: moved %d readings to the time-keyed table", self.path, moved)
                        if self._progress is not None:
                            self._progress(f"moving stored readings to the time-keyed table: {moved:,} of about {rows_left:,}")
            conn.execute("PRAGMA incremental_vacuum")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info(
            "store %s: readings keyed by time (%d moved in this run, %.1f s)", self.path, moved, time.monotonic() - started
        )
        return True

    def _check_segment_size(self, recount: bool = False) -> float:
        """Record segment_s; if the config changed it (or `recount`), rebuild the segment table
        from the readings. A segment that stays keeps its priority (its place in the reservoir)."""
        segment_s = float(self.cfg.segment_s)
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'segment_s'").fetchone()
        if row is not None and float(row[0]) == segment_s and not recount:
            return segment_s
        per_segment: dict[int, int] = {}
        with self._write_lock, self._transaction(self._conn):
            cursor = self._conn.execute("SELECT key FROM samples")
            while chunk := cursor.fetchmany(65536):
                stamps, _ = decode_keys(np.asarray(chunk, dtype=np.int64).reshape(-1))
                for seg in map(lambda t: segment_of(t, segment_s), stamps.tolist()):
                    per_segment[seg] = per_segment.get(seg, 0) + 1
            kept = dict(self._conn.execute("SELECT id, priority FROM segments").fetchall()) if recount else {}
            self._conn.execute("DELETE FROM segments")
            self._conn.executemany(
                "INSERT INTO segments (id, priority, rows) VALUES (?, ?, ?)",
                [(seg, float(kept.get(seg, self._rng.random())), n) for seg, n in per_segment.items()],
            )
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES ('segment_s', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (repr(segment_s),),
            )
        if row is not None and not recount:
            log.info("store %s: segment_s changed to %s; rebuilt %d segments", self.path, segment_s, len(per_segment))
        return segment_s

    def _channel_id(self, name: str) -> int:
        cid = self._channel_ids.get(name)
        if cid is None:
            cur = self._conn.execute("INSERT INTO channels (name) VALUES (?)", (name,))
            cid = int(cur.lastrowid or 0)
            if cid > CHANNEL_MASK:
                # Raised inside the write's transaction: the rollback removes the row again.
                raise StoreError(f"{self.path}: no channel id left for {name!r} (a store holds at most {CHANNEL_MASK} channels)")
            self._channel_ids[name] = cid
        return cid

    # -- writes ------------------------------------------------------------------------------

    @_recovers
    def write(self, readings: Sequence[Reading], held: Sequence[Reading] = (), held_at: float | None = None) -> int:
        """Store a batch in one transaction; duplicates of stored (channel, ts) keys are ignored.

        `held` readings (outside the time window while the clock is not trusted) go to the hold
        in the same transaction, stamped `held_at` (default: now; see `release_held` and
        `drop_held`). Returns how many readings were newly stored.
        """
        if not readings and not held:
            return 0
        with self._write_lock:
            if self._closed:
                raise StoreError("replay store is closed")
            self._reopen_if_broken()
            try:
                with self._transaction(self._conn) as conn:
                    added_total = self._insert(conn, readings) if readings else 0
                    if held:
                        cids = self._ids([r.channel for r in held])  # may add channels: counted before the rows
                        at = time.time() if held_at is None else float(held_at)
                        before = conn.total_changes
                        # A rare path (a wrong clock): one statement per row is fine here.
                        conn.executemany(
                            "INSERT OR IGNORE INTO held (channel_id, ts, value, held_at) VALUES (?, ?, ?, ?)",
                            [(cid, r.ts, r.value, at) for cid, r in zip(cids, held)],
                        )
                        added_held = conn.total_changes - before
                if held:
                    self._held_rows += added_held
                    low, high = min(r.ts for r in held), max(r.ts for r in held)
                    span = self._held_span
                    self._held_span = (low, high) if span is None else (min(span[0], low), max(span[1], high))
            except sqlite3.Error as exc:
                if not calls_for_check(exc):  # a damaged file is replaced instead (`_recovers`)
                    self._after_failed_write()
                if is_disk_full(exc):
                    raise DiskFullError(f"{self.path}: no space left for {len(readings) + len(held)} readings: {exc}") from exc
                raise StoreError(f"{self.path}: write failed: {exc}") from exc
        return added_total

    def _ids(self, channels: Sequence[str]) -> list[int]:
        """The channel ids of `channels`, new channels added (inside a transaction)."""
        ids = self._channel_ids
        if not ids.keys() >= set(channels):
            for name in channels:
                self._channel_id(name)
        return list(map(ids.__getitem__, channels))

    def _insert(self, conn: sqlite3.Connection, readings: Sequence[Reading]) -> int:
        """Insert into `samples` and count the rows in their segments; returns rows added.

        Timestamps are kept to the microsecond: segments are those of the stored ts.
        """
        segment_s = self._segment_s
        channels, stamps, values = zip(*readings)
        keys_array = sample_keys(np.asarray(stamps, dtype=np.float64), np.asarray(self._ids(channels), dtype=np.int64))
        keys = keys_array.tolist()
        # One flat parameter list built by C iterators.
        flat = list(chain.from_iterable(zip(keys, values)))
        low, high = decode_keys(keys_array[[int(keys_array.argmin()), int(keys_array.argmax())]])[0].tolist()
        first = segment_of(low, segment_s)
        if first == segment_of(high, segment_s):
            # The usual case, a batch within one segment: no per-row grouping.
            by_segment = {first: flat}
        else:
            by_segment = {}
            stored_ts = decode_keys(keys_array)[0].tolist()
            for i, ts in enumerate(stored_ts):
                by_segment.setdefault(segment_of(ts, segment_s), []).extend(flat[2 * i : 2 * i + 2])
        added_total = 0
        for seg, seg_flat in by_segment.items():
            before = conn.total_changes
            _insert_readings(conn, seg_flat)
            added = conn.total_changes - before
            if added:
                conn.execute(
                    "INSERT INTO segments (id, priority, rows) VALUES (?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET rows = rows + excluded.rows",
                    (seg, float(self._rng.random()), added),
                )
                added_total += added
        return added_total

    def _after_failed_write(self) -> None:
        # The in-memory channel ids may name rows the rollback removed; so may the held count.
        try:
            self._channel_ids = {name: int(cid) for cid, name in self._conn.execute("SELECT id, name FROM channels")}
            self._count_held()
        except sqlite3.Error as exc:  # the write's own error is the one raised
            log.warning("store %s: re-reading channel ids after a failed write failed too: %s", self.path, exc)

    # -- the hold ----------------------------------------------------------------------------

    def _count_held(self) -> None:
        """Read the hold's row count (a scan: at open and after a failed write only) and span."""
        self._held_rows = int(self._conn.execute("SELECT COUNT(*) FROM held").fetchone()[0])
        self._held_span = self._span_of_held(self._conn)

    @staticmethod
    def _span_of_held(conn: sqlite3.Connection) -> tuple[float, float] | None:
        # Two descents of the (ts, channel) key, however many rows are held.
        low, high = conn.execute("SELECT MIN(ts), MAX(ts) FROM held").fetchone()
        return None if low is None else (float(low), float(high))

    @property
    def held_rows(self) -> int:
        """Readings in the hold."""
        return self._held_rows

    @property
    def held_span(self) -> tuple[float, float] | None:
        """(oldest ts, newest ts) of the held readings, or None when the hold is empty."""
        return self._held_span

    @_recovers
    def release_held(self, low: float, high: float) -> tuple[list[Reading], int]:
        """Move the held readings with low <= ts <= high into the store, in one transaction.

        Returns them in ts order, and how many were newly stored (a reading stored meanwhile
        by another delivery is not stored twice).
        """
        span = self._held_span
        if span is None or span[0] > high or span[1] < low:
            return [], 0
        with self._write_lock:
            if self._closed:
                raise StoreError("replay store is closed")
            names = {cid: name for name, cid in self._channel_ids.items()}
            try:
                with self._transaction(self._conn) as conn:
                    rows = conn.execute(
                        "SELECT channel_id, ts, value FROM held WHERE ts >= ? AND ts <= ? ORDER BY ts, channel_id",
                        (low, high),
                    ).fetchall()
                    moved = [Reading(names[cid], ts, value) for cid, ts, value in rows]
                    stored = self._insert(conn, moved) if moved else 0
                    conn.execute("DELETE FROM held WHERE ts >= ? AND ts <= ?", (low, high))
                    span_left = self._span_of_held(conn)
                self._held_rows -= len(moved)
                self._held_span = span_left
            except sqlite3.Error as exc:
                if not calls_for_check(exc):
                    self._after_failed_write()
                if is_disk_full(exc):
                    raise DiskFullError(f"{self.path}: no space left to release held readings: {exc}") from exc
                raise StoreError(f"{self.path}: releasing held readings failed: {exc}") from exc
        return moved, stored

    @_recovers
    def drop_held(self, before: float, held_before: float = math.inf) -> tuple[int, int]:
        """Drop the held readings held before `held_before` (default: all of them).

        Returns how many of them were stamped before `before`, and how many after.
        """
        if not self._held_rows:
            return 0, 0
        with self._write_lock:
            if self._closed:
                raise StoreError("replay store is closed")
            try:
                with self._transaction(self._conn) as conn:
                    where, args = ("", ()) if held_before == math.inf else (" WHERE held_at < ?", (held_before,))
                    older, total = conn.execute(
                        f"SELECT COALESCE(SUM(ts < ?), 0), COUNT(*) FROM held{where}", (before, *args)
                    ).fetchone()
                    if total:
                        conn.execute(f"DELETE FROM held{where}", args)
                    span_left = self._span_of_held(conn)
                self._held_rows -= int(total)
                self._held_span = span_left
            except sqlite3.Error as exc:
                if not calls_for_check(exc):
                    self._count_held()
                raise StoreError(f"{self.path}: dropping held readings failed: {exc}") from exc
        return int(older), int(total) - int(older)

    # -- reads -------------------------------------------------------------------------------

    @_recovers
    def count(self) -> int:
        """Readings in the store (every channel, configured or not)."""
        with self._reader() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(rows), 0) FROM segments").fetchone()[0])

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        return self._file_bytes("") + self._file_bytes("-wal")

    def _file_bytes(self, suffix: str) -> int:
        try:
            return os.stat(f"{self.path}{suffix}").st_size
        except FileNotFoundError:
            return 0

    def free_bytes(self) -> int:
        """Free space on the store's file system."""
        return free_bytes(self.path.parent)

    def disk_budget_bytes(self) -> float:
        """What the store may take of its file system: what it holds plus the free space, less
        `[store] disk_reserve_mb`."""
        return self.size_bytes() + self.free_bytes() - self.cfg.disk_reserve_mb * 1024 * 1024

    def disk_short(self) -> bool:
        """Less free space than the reserve: the store may not grow, nor may updates write."""
        return self.free_bytes() < self.cfg.disk_reserve_mb * 1024 * 1024

    @_recovers
    def time_range(self) -> tuple[float, float] | None:
        """(oldest ts, newest ts) over every stored reading, or None when empty."""
        with self._reader() as conn:
            # Each of MIN and MAX is one descent of the time-first key.
            low, high = conn.execute("SELECT MIN(key), MAX(key) FROM samples").fetchone()
        if low is None:
            return None
        stamps, _ = decode_keys(np.asarray([low, high], dtype=np.int64))
        return float(stamps[0]), float(stamps[1])

    @_recovers
    def read(
        self, since: float | None = None, until: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Readings with since <= ts < until of the configured channels, ordered by ts.

        Returns (ts float64, channel_idx int64, value float64); channel_idx indexes `channels`.
        """
        low, high = key_bound(since, _KEY_MIN), key_bound(until, _KEY_MAX)
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        with self._reader() as conn, self._transaction(conn, immediate=False):
            ids = {name: int(cid) for cid, name in conn.execute("SELECT id, name FROM channels")}
            # One range of the time-first key, every channel; in chunks, so the rows are held
            # as arrays rather than as a list of Python tuples.
            cursor = conn.execute("SELECT key, value FROM samples WHERE key >= ? AND key < ?", (low, high))
            while chunk := cursor.fetchmany(65536):
                keys.append(np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk)))
                values.append(np.fromiter((row[1] for row in chunk), dtype=np.float64, count=len(chunk)))
        if not keys:
            return np.empty(0, np.float64), np.empty(0, np.int64), np.empty(0, np.float64)
        ts, cids = decode_keys(np.concatenate(keys))
        # Configured channel index by channel id (-1: a channel not configured).
        index = np.full(CHANNEL_MASK + 1, -1, dtype=np.int64)
        for idx, name in enumerate(self.channels):
            if name in ids:
                index[ids[name]] = idx
        channel_idx = index[cids]
        keep = channel_idx >= 0
        ts, channel_idx, value = ts[keep], channel_idx[keep], np.concatenate(values)[keep]
        # Ordered by ts, then by the configured channel order (the key orders by channel id).
        order = np.lexsort((channel_idx, ts))
        return ts[order], channel_idx[order], value[order]

    @_recovers
    def bucket_stats(self, bucket_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per time bucket [k * bucket_s, (k + 1) * bucket_s) and configured channel: the readings'
        count, mean and standard deviation, aggregated in SQLite (nothing the size of the store is read;
        timestamps are positive unix seconds, so the cast is the floor).

        Returns (bucket starts (B,), counts (B, C), stats (B, C, 2) mean and std; NaN where empty).
        """
        size = float(bucket_s)
        per: dict[int, dict[int, tuple[int, float, float]]] = {}
        with self._reader() as conn, self._transaction(conn, immediate=False):
            ids = {name: int(cid) for cid, name in conn.execute("SELECT id, name FROM channels")}
            idx_of = {ids[name]: idx for idx, name in enumerate(self.channels) if name in ids}
            for k, cid, n, s1, s2 in conn.execute(
                f"SELECT CAST(((key >> {CHANNEL_BITS}) / 1e6) / ? AS INTEGER) AS k, key & {CHANNEL_MASK} AS cid,"
                " COUNT(*), AVG(value), AVG(value * value) FROM samples GROUP BY k, cid",
                (size,),
            ):
                if cid in idx_of:
                    per.setdefault(int(k), {})[idx_of[cid]] = (int(n), float(s1), float(s2))
        keys = sorted(per)
        n_ch = len(self.channels)
        counts = np.zeros((len(keys), n_ch), dtype=np.int64)
        stats = np.full((len(keys), n_ch, 2), np.nan)
        for row, k in enumerate(keys):
            for idx, (n, s1, s2) in per[k].items():
                counts[row, idx] = n
                stats[row, idx] = (s1, math.sqrt(max(0.0, s2 - s1 * s1)))
        return np.asarray(keys, dtype=np.float64) * size, counts, stats

    @_recovers
    def replay_segments(self, before: float, rng: np.random.Generator, max_segments: int) -> list[tuple[float, float]]:
        """Up to max_segments (start, end) spans, drawn uniformly without replacement from the
        stored segments that end at or before `before`; sorted by start.

        Each span is a whole retention segment, so `read(start, end)` returns a contiguous window.
        """
        if max_segments <= 0:
            return []
        segment_s = self._segment_s
        last = math.floor(before / segment_s) - 1  # segments ending at or before `before`
        with self._reader() as conn:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM segments WHERE id <= ? AND rows > 0", (last,))]
        if not ids:
            return []
        chosen = rng.choice(np.asarray(ids, dtype=np.int64), size=min(max_segments, len(ids)), replace=False)
        return [(float(k * segment_s), float((k + 1) * segment_s)) for k in sorted(int(c) for c in chosen)]

    # -- retention ---------------------------------------------------------------------------

    def _page_stats(self) -> tuple[int, int, int]:
        page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        page_count = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
        freelist = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        return page_size, page_count, freelist

    def _reclaim(self, budget: float) -> bool:
        """Give freed pages back to the file system and empty the WAL; VACUUM if that is not enough.

        Not while a scheduled check holds its snapshot of the whole file: a TRUNCATE checkpoint
        would wait for it (with the write lock held, ingestion too); the next run does it."""
        if self._checking:
            log.info("store %s: a check is under way; pages are handed back at the next retention run", self.path)
            return False
        # TRUNCATE also resets the WAL file to zero bytes; it can only be partial while a reader
        # holds an old snapshot, which the next run catches up on.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.execute("PRAGMA incremental_vacuum")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = self.size_bytes()
        if size <= budget:
            return False
        if self.free_bytes() < size:
            # VACUUM writes a whole copy first; on a file system without that room it would only fail.
            log.info("store %s: %d bytes after retention, over budget; no room to VACUUM", self.path, size)
            return False
        # Pages half-emptied by deletes are not free pages; only a rebuild packs them again.
        log.info("store %s: %d bytes after retention, over budget; running VACUUM", self.path, size)
        self._conn.execute("VACUUM")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    @_recovers
    def run_retention(self, now: float | None = None) -> dict[str, float | int | bool]:
        """Keep the file under the budget; returns what was done.

        Readings newer than recent_hours are kept whole; older data is kept as a uniform sample of
        whole segments (the ones with the lowest random priority: bottom-k), at least
        reservoir_fraction of the budget plus whatever room the recent data leaves.

        The budget is `[store] budget_mb`, or less where the file system has less room
        (`disk_budget_bytes`): then older data goes first, and recent data is never dropped for
        want of disk space (ingestion waits instead, the broker keeping what it has not
        acknowledged), only for the configured budget.
        """
        if now is None:
            # Recent by the newest stored reading where the clock runs ahead of the data (a clock
            # set wrong must not turn recent data into old data and sample it away).
            now = time.time()
            # The newest reading, not its segment's end: that would count up to a segment of
            # readings within recent_hours of the newest as old.
            newest = self.time_range()
            if newest is not None:
                now = min(now, newest[1])
        now = float(now)
        configured = self.cfg.budget_mb * 1024 * 1024
        budget = max(0.0, min(configured, self.disk_budget_bytes()))
        segment_s = self._segment_s
        recent_from = segment_of(now - self.cfg.recent_hours * 3600.0, segment_s)  # first recent segment
        report: dict[str, float | int | bool] = {"bytes_before": self.size_bytes()}
        deleted_rows = 0
        deleted_segments = 0
        vacuumed = False
        with self._write_lock:
            if self._closed:
                raise StoreError("replay store is closed")
            if self._broken is not None:
                raise StoreError(f"{self.path}: replay store unavailable: {self._broken}")
            page_size, page_count, freelist = self._page_stats()
            rows_total = self.count()
            used = (page_count - freelist) * page_size
            report["rows_before"] = rows_total
            # What the file system holds (free pages and the WAL included) counts, not only
            # the pages in use: the budget is for the file.
            if rows_total and max(used, self.size_bytes()) > HIGH_WATER * budget:
                bytes_per_row = used / rows_total
                allowed = int(LOW_WATER * budget / bytes_per_row)
                # Recent data yields to the configured budget only.
                allowed_recent = int(LOW_WATER * configured / bytes_per_row)
                reservoir_min = int(self.cfg.reservoir_fraction * allowed_recent)
                segments = self._conn.execute("SELECT id, priority, rows FROM segments").fetchall()
                recent = sorted((s for s in segments if s[0] >= recent_from), key=lambda s: s[0])
                old = sorted((s for s in segments if s[0] < recent_from), key=lambda s: s[1])
                drop: list[int] = []
                recent_rows = sum(s[2] for s in recent)
                # The budget is a hard limit: if recent data alone would crowd out the minimum
                # reservoir, its oldest segments go too (and the operator is told).
                while recent and recent_rows > allowed_recent - reservoir_min:
                    seg = recent.pop(0)
                    recent_rows -= seg[2]
                    drop.append(seg[0])
                if drop:
                    log.warning(
                        "store %s: recent data exceeds the budget of %.1f MB; dropped its %d oldest segments",
                        self.path, self.cfg.budget_mb, len(drop),
                    )
                room = max(0, allowed - recent_rows)
                kept_rows = 0
                kept_segments = 0
                full = False
                # Lowest priorities first: the kept set is the bottom-k of uniform random keys, a
                # uniform sample of segments whatever k the room allows. Once one segment does
                # not fit no later one is kept, or large segments would be biased against.
                for seg_id, _priority, n in old:
                    if not full and kept_rows + n <= room:
                        kept_rows += n
                        kept_segments += 1
                    else:
                        full = True
                        drop.append(seg_id)
                report["reservoir_segments"] = kept_segments
                report["recent_rows"] = recent_rows
                with self._transaction(self._conn) as conn:
                    for seg_id in drop:
                        start, end = seg_id * segment_s, (seg_id + 1) * segment_s
                        # A segment is one range of the time-first key, every channel.
                        cur = conn.execute(
                            "DELETE FROM samples WHERE key >= ? AND key < ?",
                            (key_bound(start, _KEY_MIN), key_bound(end, _KEY_MAX)),
                        )
                        deleted_rows += cur.rowcount
                        conn.execute("DELETE FROM segments WHERE id = ?", (seg_id,))
                deleted_segments = len(drop)
                if deleted_segments:
                    log.info(
                        "store %s: retention removed %d readings in %d segments", self.path, deleted_rows, deleted_segments
                    )
            # Only a run that freed pages, or a file over its budget, checkpoints the WAL and
            # hands pages back: a checkpoint writes every page the commits since the last one
            # touched, so the pages each commit rewrites (its last, partly filled leaf, the tree
            # above it) reach the file once per WAL (SQLite's own checkpoint at
            # wal_autocheckpoint pages) rather than once per retention run.
            # Nor may the WAL grow large beside the file system's free space: a checkpoint
            # copies it into store.db, which needs room of its own while the WAL still holds it.
            if deleted_rows or self.size_bytes() > budget or self._file_bytes("-wal") * 4 > self.free_bytes():
                # VACUUM only for the configured budget: under a disk-capped one that recent
                # data keeps exceeded, it would rewrite the whole file at every run and free nothing.
                vacuumed = self._reclaim(configured)
            report["rows_after"] = self.count()
        report.update(
            deleted_rows=deleted_rows,
            deleted_segments=deleted_segments,
            vacuumed=vacuumed,
            bytes_after=self.size_bytes(),
        )
        return report

    # -- damage ------------------------------------------------------------------------------

    def check_now(self) -> StoreCheck:
        """`PRAGMA quick_check` of the live store (a snapshot: writes go on meanwhile), for damage
        no read has met yet; a damaged store is replaced (`recover`). Returns what was found."""
        generation = self._generation
        started = time.monotonic()
        self._checking = True
        try:
            with self._reader() as conn:
                problem = quick_check(conn)
            drop_cached_pages(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot check the replay store: {exc}") from exc
        finally:
            self._checking = False
        if problem is not None:
            if not self.recovers:
                raise StoreError(f"{self.path}: the replay store is damaged: {problem}")
            return self.recover(problem, generation, cause="scheduled")
        self.last_check = StoreCheck(time.monotonic() - started, None, None, time.time(), "scheduled")
        return self.last_check

    def recover(self, error: str, generation: int | None = None, cause: str | None = None) -> StoreCheck:
        """After `error` (damage or an I/O error met while running): close every connection,
        check the file (`check_store`) and open it again, or a new store in its place if it is
        damaged (the damaged one moved aside, an `on_replaced` call made). Nothing is lost that
        a later write brings: a batch that failed on the damaged store is written to the new one.

        `generation` is the file the error was met on: if another thread has replaced it since,
        nothing is done."""
        with self._write_lock:
            if self._closed:
                raise StoreError("replay store is closed")
            if generation is not None and generation != self._generation:
                return self.last_check or StoreCheck(0.0, None, None, time.time(), error)
            log.warning("store %s: %s; checking the store", self.path, error)
            with self._readers_lock:
                self._recovering = True
                self._generation += 1
                for conn in self._idle_readers:
                    conn.close()
                self._idle_readers.clear()
            try:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                try:
                    check = check_store(self.path, cause=cause or error)
                except StoreError as exc:
                    self._reopen(f"the check failed: {exc}")
                    raise
                # Recorded (and told, below) before the file opens again: the damaged one has
                # gone aside whether or not the new one can be made.
                self.last_check = check
                if check.moved_to is not None:
                    self.replaced.append(check)
                self._reopen("" if check.moved_to is None else f"a new store after {check.moved_to.name}")
            finally:
                with self._readers_lock:
                    self._recovering = False
                    self._generation += 1
                    self._readers_changed.notify_all()
        if check.moved_to is None:
            log.warning("store %s passed its check (%.1f s): carrying on with it", self.path, check.seconds)
            return check
        for hook in self.on_replaced:
            try:
                hook(check)
            except Exception:
                log.exception("on_replaced hook %r failed", hook)
        return check

    def _reopen(self, what: str) -> None:
        """Open the file again after a check (with the write lock held). If it cannot be opened,
        the store is unavailable (every call raises StoreError) until a later write opens it."""
        try:
            self._open()
            self._broken = None
        except StoreError as exc:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._broken = f"{what}: {exc}" if what else str(exc)
            log.error("store %s: cannot be opened again after its check: %s", self.path, exc)

    def _reopen_if_broken(self) -> None:
        """A write (with the write lock held) to a store left unavailable by a failed reopen
        tries to open it once more first."""
        if self._broken is None:
            return
        self._reopen("")
        if self._broken is not None:
            raise StoreError(f"{self.path}: replay store unavailable: {self._broken}")

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the WAL into the database and close every connection."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                for conn in self._idle_readers:
                    conn.close()
                self._idle_readers.clear()
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("store %s: checkpoint at close failed: %s", self.path, exc)
            self._conn.close()

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
