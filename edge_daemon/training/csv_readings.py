"""Readings from a CSV file (wide or long layout), for pretraining a base model from a file."""

from __future__ import annotations

import csv
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge_daemon.errors import TrainingError

log = logging.getLogger(__name__)

# Names the first (time) column may have.
TS_COLUMNS = ("ts", "timestamp", "time")


def _parse_ts(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)  # naive times are taken as UTC
        return stamp.timestamp()


def read_csv_readings(csv_path: Path, channels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings of the configured channels from a CSV, as (ts float64[], channel_idx int64[], value float64[]).

    Two layouts, told apart by the header:
      wide: `ts,<channel>,<channel>,...` - one row per time, one column per channel
            named exactly like it; empty cells are missing readings.
      long: `ts,channel,value` - one reading per row.
    `ts` is unix seconds or ISO 8601 (naive = UTC); the first column may also be
    called `timestamp` or `time`. Columns and rows of unknown channels and
    unparsable cells are skipped (counted in the log); a configured channel
    with no column in a wide file is an error.
    """
    index = {name: i for i, name in enumerate(channels)}
    ts_out: list[float] = []
    ch_out: list[int] = []
    val_out: list[float] = []
    skipped = 0
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [cell.strip() for cell in next(reader)]
        except StopIteration:
            raise TrainingError(f"{csv_path}: empty CSV") from None
        if not header or header[0].lower() not in TS_COLUMNS:
            raise TrainingError(f"{csv_path}: first column must be 'ts' (got {header[:1]})")
        long_format = [h.lower() for h in header] == ["ts", "channel", "value"] or (
            len(header) == 3 and header[1].lower() == "channel" and header[2].lower() == "value"
        )
        if long_format:
            for row in reader:
                try:
                    column = index.get(row[1].strip())
                    if column is None:
                        skipped += 1
                        continue
                    ts, value = _parse_ts(row[0]), float(row[2])
                except (ValueError, IndexError):
                    skipped += 1
                    continue
                ts_out.append(ts)
                ch_out.append(column)
                val_out.append(value)
        else:
            missing = [name for name in channels if name not in header]
            if missing:
                raise TrainingError(f"{csv_path}: no column for channels {missing} (columns: {header[1:]})")
            columns = [(header.index(name), index[name]) for name in channels]
            for row in reader:
                try:
                    ts = _parse_ts(row[0])
                except (ValueError, IndexError):
                    skipped += 1
                    continue
                for position, column in columns:
                    cell = row[position].strip() if position < len(row) else ""
                    if not cell:
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        skipped += 1
                        continue
                    ts_out.append(ts)
                    ch_out.append(column)
                    val_out.append(value)
    if skipped:
        log.warning("%s: skipped %d unparsable or unknown-channel entries", csv_path, skipped)
    return np.asarray(ts_out, dtype=np.float64), np.asarray(ch_out, dtype=np.int64), np.asarray(val_out, dtype=np.float64)
