"""Durable, atomic file writes: the one way the daemon replaces a file readers may open.

A reader (systemd reading a unit, the daemon reading the adapter pointer, a trace being
reported) sees the old content or the new, never a torn write, and what was written survives
power loss once the call returns: the data and the directory entry are fsynced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: its entries, after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex): what artifacts record at save and check before they are used."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def damaged_files(directory: Path, recorded: dict[str, str]) -> list[str]:
    """The files of `recorded` (name -> sha256) under `directory` that are missing or differ."""
    damaged = []
    for name, expected in recorded.items():
        try:
            if sha256_of(directory / name) != expected:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories themselves."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Replace `path` with `data` as JSON, atomically and fsynced: indented with sorted keys (a
    config or meta file, read by people too), or `compact` (a trace: tens of kB of numbers)."""
    if compact:
        text = json.dumps(data, separators=(",", ":"))
    else:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    replace_atomically(path, text)


def replace_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` (file mode `mode`, else the temp file's 0600) via a temp
    file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
