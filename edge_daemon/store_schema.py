"""The replay store's schema and its migrations (sqlite-utils' `Migrations`).

Each migration runs in one transaction and is recorded in `_sqlite_migrations`
under the set MIGRATION_SET; a store written before that record existed has its
own `migrations` table adopted into it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import sqlite_utils


def _create_schema(db: sqlite_utils.Database) -> None:
    conn = db.conn
    # Channel names are stored once; readings carry a small integer id, which keeps rows short.
    conn.execute("CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    # WITHOUT ROWID: the (channel_id, ts) key *is* the table, so there is no second b-tree and
    # per-channel time ranges (reads, retention deletes) are contiguous key ranges.
    conn.execute(
        "CREATE TABLE readings (channel_id INTEGER NOT NULL, ts REAL NOT NULL, value REAL NOT NULL,"
        " PRIMARY KEY (channel_id, ts)) WITHOUT ROWID"
    )
    # One row per time segment that holds readings: its row count (so count() and retention do
    # not scan the readings) and a random priority fixed at creation (bottom-k reservoir sample).
    conn.execute("CREATE TABLE segments (id INTEGER PRIMARY KEY, priority REAL NOT NULL, rows INTEGER NOT NULL)")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _create_held(db: sqlite_utils.Database) -> None:
    # Readings acknowledged while the device clock was not trusted and outside the time window
    # it allows: kept apart from `readings` (retention, replay and training never see them) until
    # the clock says they fit, or they have waited too long. Keyed by ts first: releases take ts
    # ranges; `held_at` (the device clock when it was held) is indexed for expiry.
    db.conn.execute(
        "CREATE TABLE held (ts REAL NOT NULL, channel_id INTEGER NOT NULL, value REAL NOT NULL, held_at REAL NOT NULL,"
        " PRIMARY KEY (ts, channel_id)) WITHOUT ROWID"
    )
    db.conn.execute("CREATE INDEX held_by_age ON held (held_at)")


def _readings_by_time(db: sqlite_utils.Database) -> None:
    # Readings keyed by time first, in a rowid table: key = ts in whole microseconds x 1024 +
    # channel id. Live readings arrive in time order, so a commit appends to the rightmost leaf,
    # which SQLite fills completely (its quick balance for rowid tables) before opening the
    # next: a commit writes the pages its rows fill plus a few, whatever the channel count.
    # The (channel_id, ts) key it replaces put each channel's newest rows in a page of their
    # own and left index leaves half full. The rows stay unique per (channel, ts).
    conn = db.conn
    conn.execute(f"ALTER TABLE readings RENAME TO {LEGACY_READINGS}")
    conn.execute("CREATE TABLE samples (key INTEGER PRIMARY KEY, value REAL NOT NULL)")
    # The readings as (channel_id, ts, value) rows, for people and tools reading the file.
    conn.execute(
        f"CREATE VIEW readings AS SELECT key & {CHANNEL_MASK} AS channel_id,"
        f" (key >> {CHANNEL_BITS}) / 1e6 AS ts, value FROM samples"
    )


# Named schema migrations, applied in order by sqlite-utils' `Migrations` (each in one
# transaction with its record in `_sqlite_migrations`, under the set MIGRATION_SET). Append
# only: never edit or reorder an entry that has shipped.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _create_schema),
    ("0002_held", _create_held),
    ("0003_readings_by_time", _readings_by_time),
]
# 0003 renames the (channel_id, ts) table to this; the store moves its rows into `samples` in
# chunks of their own transactions when it opens (resumable) and then drops it.
LEGACY_READINGS = "readings_by_channel"
# A sample's key: ts in whole microseconds, shifted left by CHANNEL_BITS, plus the channel id.
# 10 bits leave 1023 channel ids and timestamps up to the year 2255 in a signed 64-bit key.
CHANNEL_BITS = 10
CHANNEL_MASK = (1 << CHANNEL_BITS) - 1
MIGRATION_SET = "edge-daemon"
# Where versions before sqlite-utils' migrations recorded theirs: (name, applied_at unix s).
LEGACY_MIGRATIONS_TABLE = "migrations"


def migration_set() -> sqlite_utils.Migrations:
    """MIGRATIONS as a sqlite-utils migration set."""
    migrations = sqlite_utils.Migrations(MIGRATION_SET)
    for name, apply in MIGRATIONS:
        migrations(name=name)(apply)
    return migrations


def adopt_legacy_record(db: sqlite_utils.Database, migrations: sqlite_utils.Migrations) -> None:
    """Move the record of a store written before sqlite-utils' migrations into theirs, in one
    transaction, so its applied migrations are not applied again."""
    if LEGACY_MIGRATIONS_TABLE not in db.table_names():
        return
    with db.atomic():
        migrations.ensure_migrations_table(db)
        rows = db.conn.execute(f"SELECT name, applied_at FROM {LEGACY_MIGRATIONS_TABLE} ORDER BY applied_at, name")
        db[migrations.migrations_table].insert_all(  # type: ignore[union-attr]
            {
                "migration_set": MIGRATION_SET,
                "name": name,
                "applied_at": str(datetime.datetime.fromtimestamp(applied_at, datetime.timezone.utc)),
            }
            for name, applied_at in rows
        )
        db.conn.execute(f"DROP TABLE {LEGACY_MIGRATIONS_TABLE}")
