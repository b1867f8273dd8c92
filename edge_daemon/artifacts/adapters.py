"""Versioned LoRA adapters on disk in `adapters/v<N>/`, the `current` pointer and its history.

Adapters are stored in peft's own format, but serving never imports peft: the LoRA tensors
and config are read here from the safetensors and JSON files (`merge` merges them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edge_daemon.artifacts.files import damaged_files, fsync_path, fsync_tree, read_json, replace_atomically, sha256_of, write_json
from edge_daemon.artifacts.peft_format import ADAPTER_CONFIG_FILE, ADAPTER_FILES, ADAPTER_WEIGHTS_FILE
from edge_daemon.times import iso, now_iso
from edge_daemon.errors import AdapterError
from edge_daemon.training.records import AdapterMeta

log = logging.getLogger(__name__)

META_FILE = "meta.json"
POINTER_FILE = "current"
NO_ADAPTER = "none"
# One JSON line per change of what is served (commit, rollback, base only), for reports.
HISTORY_FILE = "history.jsonl"
# Staging dirs older than this are leftovers of a crashed update.
STALE_STAGING_S = 3600.0


@dataclass(frozen=True)
class AdapterVersion:
    """One stored adapter: `path` is loadable with `PeftModel.from_pretrained(base, path)`."""

    version: int
    path: Path
    created: str  # iso8601
    size_bytes: int  # adapter_config.json + adapter_model.safetensors
    meta: AdapterMeta = field(default_factory=AdapterMeta)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the control socket and the CLI."""
        return {
            "version": self.version,
            "path": str(self.path),
            "created": self.created,
            "size_bytes": self.size_bytes,
            "meta": self.meta.to_json(),
        }


_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")


class AdapterStore:
    """Versioned adapters under `root`: `v<N>/` directories and a `current` pointer file.

    A version directory appears only whole (built in a staging dir, fsynced,
    renamed); the pointer is replaced with a single os.replace. Commits and
    rollbacks from different processes are serialised with a lock file.
    """

    def __init__(self, root: Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading

    def _version_dirs(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for entry in self.root.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
        return found

    def _describe(self, version: int, path: Path) -> AdapterVersion:
        try:
            data = read_json(path / META_FILE)
            if not isinstance(data, dict):
                raise ValueError("meta.json is not an object")
            meta = AdapterMeta.from_json(data)
            size = sum((path / name).stat().st_size for name in ADAPTER_FILES)
        except (OSError, ValueError, TypeError) as exc:
            raise AdapterError(f"adapter v{version} in {path} is corrupt: {exc}") from None
        created = str(meta.created or iso(path.stat().st_mtime))
        return AdapterVersion(version=version, path=path, created=created, size_bytes=size, meta=meta)

    def list(self) -> list[AdapterVersion]:
        """Every readable version, oldest first; corrupt ones are logged and skipped."""
        versions = []
        for number, path in sorted(self._version_dirs().items()):
            try:
                versions.append(self._describe(number, path))
            except AdapterError as exc:
                log.warning("%s", exc)
        return versions

    def get(self, version: int) -> AdapterVersion:
        path = self.root / f"v{version}"
        if not path.is_dir():
            raise AdapterError(f"no adapter version {version}")
        return self._describe(version, path)

    def current_version(self) -> int | None:
        """The version the pointer names, or None when it is absent or 'none' (base model only)."""
        try:
            text = (self.root / POINTER_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if text == NO_ADAPTER:
            return None
        match = re.fullmatch(r"v?([1-9][0-9]*)", text)
        if not match:
            raise AdapterError(f"adapter pointer {self.root / POINTER_FILE} is corrupt: {text!r}")
        return int(match.group(1))

    def current(self) -> AdapterVersion | None:
        """The served adapter; None means the base model alone. AdapterError if the pointer names a missing version."""
        number = self.current_version()
        return None if number is None else self.get(number)

    # -- writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def staging_dir(self) -> Path:
        """A fresh empty directory under root (same filesystem, so commit is a rename) for `save_pretrained`."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def discard(self, staging: Path) -> None:
        """Remove a staging dir whose update was rejected or failed."""
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, meta: AdapterMeta, make_current: bool = True) -> AdapterVersion:
        """Turn a staging dir written by `save_pretrained` into the next version `v<N>`.

        Writes meta.json, fsyncs files and directories, renames, then (if
        `make_current`) points `current` at it and prunes to the last `keep`
        versions, never removing the current one.
        """
        staging = Path(staging)
        if staging.parent.resolve() != self.root.resolve():
            raise AdapterError(f"staging dir {staging} is not under {self.root}")
        for name in ADAPTER_FILES:
            if not (staging / name).is_file():
                raise AdapterError(f"staging dir {staging} has no {name}: was save_pretrained called on it?")
        with self._locked():
            existing = self._version_dirs()
            number = max(existing, default=0) + 1
            target = self.root / f"v{number}"
            try:
                sums = {name: sha256_of(staging / name) for name in ADAPTER_FILES}
                write_json(staging / META_FILE, replace(meta, created=meta.created or now_iso(), version=number, sha256=sums).to_json())
                fsync_tree(staging)
                os.rename(staging, target)
            except BaseException:
                # Not renamed, so not a version: a staging dir half written (a full disk, say) goes.
                self.discard(staging)
                raise
            fsync_path(self.root)
            if make_current:
                replace_atomically(self.root / POINTER_FILE, f"v{number}\n")
                self._record("commit", number, meta.served_from_ts)
            self._prune()
        version = self.get(number)
        log.info("committed adapter v%d (%d bytes)%s", number, version.size_bytes, ", now current" if make_current else "")
        return version

    def make_current(self, version: int) -> AdapterVersion:
        """Point `current` at a version committed with `make_current=False` once it serves (the
        daemon does, after its scorer swapped it in): the pointer never names a version that
        nothing served. Recorded as its commit, at the version's `served_from_ts`."""
        with self._locked():
            target = self.get(version)
            replace_atomically(self.root / POINTER_FILE, f"v{version}\n")
            self._record("commit", version, target.meta.served_from_ts)
        log.info("adapter v%d now current", version)
        return target

    def rollback(self, version: int, data_ts: float | None = None) -> AdapterVersion:
        """Serve an earlier (or any stored) version; AdapterError if it is missing or corrupt.

        `data_ts`: the newest reading's time when it happened (the data's clock), for reports.
        """
        with self._locked():
            target = self.get(version)
            check_adapter(target)  # refuse to point at something we could not serve
            load_lora_state(target.path)
            replace_atomically(self.root / POINTER_FILE, f"v{version}\n")
            self._record("rollback", version, data_ts)
        log.info("adapter pointer set to v%d", version)
        return target

    def use_base(self, data_ts: float | None = None) -> None:
        """Serve the base model alone (pointer 'none'); stored versions stay."""
        with self._locked():
            replace_atomically(self.root / POINTER_FILE, f"{NO_ADAPTER}\n")
            self._record("use_base", None, data_ts)
        log.info("adapter pointer set to none (base model only)")

    def _record(self, event: str, version: int | None, data_ts: Any) -> None:
        # Appended, not fsynced: losing the last line in a power cut only blurs a report.
        entry = {"ts": time.time(), "event": event, "version": version}
        if isinstance(data_ts, (int, float)) and math.isfinite(data_ts):
            entry["data_ts"] = float(data_ts)
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as history:
            history.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict[str, Any]]:
        """Every recorded change of the served adapter, oldest first (unreadable lines skipped)."""
        try:
            lines = (self.root / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("ts"), (int, float)):
                entries.append(entry)
        return entries

    def _prune(self) -> None:
        versions = sorted(self._version_dirs().items())
        current = self.current_version()
        keep = {number for number, _ in versions[-self.keep :]}
        if current is not None:
            keep.add(current)
        for number, path in versions:
            if number not in keep:
                shutil.rmtree(path, ignore_errors=True)
                log.info("pruned adapter v%d", number)
        now = time.time()
        for stale in self.root.glob(".staging-*"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(stale, ignore_errors=True)


class AdapterDamagedError(AdapterError):
    """An adapter's files no longer match the sha256 recorded when it was committed."""


def check_adapter(version: AdapterVersion) -> None:
    """AdapterDamagedError when a file of `version` differs from the sha256 its meta recorded (an
    adapter from before they were recorded is taken as it is)."""
    recorded = version.meta.sha256
    if not recorded:
        return
    damaged = damaged_files(version.path, recorded)
    if damaged:
        raise AdapterDamagedError(f"adapter v{version.version} is damaged: {', '.join(damaged)} no longer match their sha256")


def load_lora_state(version_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read peft's adapter_model.safetensors and adapter_config.json without importing peft."""
    version_dir = Path(version_dir)
    try:
        lora_cfg = read_json(version_dir / ADAPTER_CONFIG_FILE)
        tensors = load_file(str(version_dir / ADAPTER_WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise AdapterError(f"cannot read adapter in {version_dir}: {exc}") from None
    if not isinstance(lora_cfg, dict) or lora_cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{version_dir} is not a LoRA adapter (peft_type {lora_cfg.get('peft_type')!r})")
    # These change the merge formula or add non-LoRA weights; the trainer does not use them.
    for unsupported in ("use_dora", "modules_to_save", "layer_replication", "trainable_token_indices"):
        if lora_cfg.get(unsupported):
            raise AdapterError(f"adapter in {version_dir} uses {unsupported}, which serving cannot merge")
    return tensors, lora_cfg
