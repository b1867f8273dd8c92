"""Versioned LoRA adapters on disk in `adapters/v<N>/`, the `current` pointer and its history.

Adapters are stored in peft's own format, but serving never imports peft: the LoRA tensors
and config are read here from the safetensors and JSON files (`merge` merges them). A version
may carry its weights in int8 instead of (or beside) peft's float32 file
(`peft_format.ADAPTER_INT8_WEIGHTS_FILE`); the int8 codec, which the trainer's fake
quantisation shares so that what it trained is what is saved, is here too.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edge_daemon.artifacts.files import damaged_files, fsync_path, fsync_tree, read_json, replace_atomically, sha256_of, write_json
from edge_daemon.artifacts.peft_format import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_INT8_WEIGHTS_FILE,
    ADAPTER_WEIGHT_FILES,
    ADAPTER_WEIGHTS_FILE,
    INT8_FORMAT,
    INT8_FORMAT_KEY,
    INT8_LAYOUT_KEY,
    INT8_SCALES,
    INT8_VALUES,
    int8_layout,
    lora_key,
    parse_int8_layout,
)
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
    """One stored adapter: `path` is loadable with `PeftModel.from_pretrained(base, path)` when it
    holds peft's float32 weights (an int8-only version is read by `load_lora_state` alone)."""

    version: int
    path: Path
    created: str  # iso8601
    size_bytes: int  # adapter_config.json + whichever weight files it holds
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
            weights = _weight_files(path)
            if not weights:
                raise ValueError(f"no {' or '.join(ADAPTER_WEIGHT_FILES)}")
            size = sum((path / name).stat().st_size for name in (ADAPTER_CONFIG_FILE, *weights))
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
        if not (staging / ADAPTER_CONFIG_FILE).is_file():
            raise AdapterError(f"staging dir {staging} has no {ADAPTER_CONFIG_FILE}: was save_pretrained called on it?")
        weights = _weight_files(staging)
        if not weights:
            raise AdapterError(f"staging dir {staging} has no {' or '.join(ADAPTER_WEIGHT_FILES)}: was save_pretrained called on it?")
        with self._locked():
            existing = self._version_dirs()
            number = max(existing, default=0) + 1
            target = self.root / f"v{number}"
            try:
                # Whichever weight files it holds are checked before serving, not only the one read.
                sums = {name: sha256_of(staging / name) for name in (ADAPTER_CONFIG_FILE, *weights)}
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


def _weight_files(directory: Path) -> list[str]:
    """The weight files `directory` holds, peft's float32 one first."""
    return [name for name in ADAPTER_WEIGHT_FILES if (directory / name).is_file()]


def load_lora_state(version_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter without importing peft: adapter_config.json, and float32 LoRA tensors under
    peft's keys, from adapter_model.safetensors when it is there, else dequantised from the int8 file.

    When both are there they hold the same values (the float32 file is the int8 one dequantised).
    """
    version_dir = Path(version_dir)
    try:
        lora_cfg = read_json(version_dir / ADAPTER_CONFIG_FILE)
        if (version_dir / ADAPTER_WEIGHTS_FILE).is_file() or not (version_dir / ADAPTER_INT8_WEIGHTS_FILE).is_file():
            tensors = load_file(str(version_dir / ADAPTER_WEIGHTS_FILE))
        else:
            tensors = load_int8_lora(version_dir / ADAPTER_INT8_WEIGHTS_FILE)
    except (OSError, ValueError, SafetensorError) as exc:
        raise AdapterError(f"cannot read adapter in {version_dir}: {exc}") from None
    if not isinstance(lora_cfg, dict) or lora_cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{version_dir} is not a LoRA adapter (peft_type {lora_cfg.get('peft_type')!r})")
    # These change the merge formula or add non-LoRA weights; the trainer does not use them.
    for unsupported in ("use_dora", "modules_to_save", "layer_replication", "trainable_token_indices"):
        if lora_cfg.get(unsupported):
            raise AdapterError(f"adapter in {version_dir} uses {unsupported}, which serving cannot merge")
    return tensors, lora_cfg


# -- int8 weights


def quantize_per_rank(weight: torch.Tensor, rank_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 (-127..127) of a LoRA weight with one float32 scale per rank component:
    `rank_dim` 0 for lora_A (r, in), one scale per row; 1 for lora_B (out, r), one per column.

    Why per rank component: the delta is a sum of r outer products B[:, k] A[k, :], each with its
    own magnitude, and one scale per component keeps a large one from coarsening the others (as
    one scale per tensor does), for r scales per tensor. One per row of B would add a 4-byte scale
    for every r = 4 int8 weights of B. Measured on the default adapter after a regime change: per
    tensor 7.8 kB with 7.7e-3 relative error in B @ A, per rank component 8.0 kB and 6.5e-3, per
    row of B 11.5 kB (+43%) and 5.2e-3; all three, even applied after float32 training, kept the
    held-out loss within 0.4% of the float32 adapter's.
    """
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1 - rank_dim)
    scale = amax / 127.0
    # An all-zero component (lora_B at init) or one so small its scale underflows: any positive
    # scale quantises it to zeros, and 1.0 keeps the division finite.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(1 - rank_dim)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_rank(q: torch.Tensor, scale: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """The float32 weight an int8 one stands for. The trainer's fake quantisation and the reader of
    the int8 file both use this, so what was trained and what is loaded are the same bits."""
    return q.to(torch.float32) * scale.unsqueeze(1 - rank_dim)


QuantizedLora = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (q_A, scale_A), (q_B, scale_B)


def save_int8_lora(path: Path, modules: dict[str, QuantizedLora]) -> None:
    """Write the int8 weights of `modules` (module name -> its quantised lora_A and lora_B) to `path`."""
    layout = []
    values: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for name, ((q_a, s_a), (q_b, s_b)) in modules.items():
        r, n_in = q_a.shape
        n_out = q_b.shape[0]
        if q_b.shape != (n_out, r) or s_a.shape != (r,) or s_b.shape != (r,):
            raise ValueError(f"int8 LoRA weights of {name} have inconsistent shapes")
        layout.append((name, r, n_in, n_out))
        values += [q_a.reshape(-1), q_b.reshape(-1)]
        scales += [s_a, s_b]
    tensors = {
        INT8_VALUES: torch.cat(values) if values else torch.zeros(0, dtype=torch.int8),
        INT8_SCALES: torch.cat(scales).to(torch.float32) if scales else torch.zeros(0),
    }
    metadata = {"format": "pt", INT8_FORMAT_KEY: INT8_FORMAT, INT8_LAYOUT_KEY: int8_layout(layout)}
    save_file(tensors, str(path), metadata=metadata)


def load_int8_lora(path: Path) -> dict[str, torch.Tensor]:
    """The float32 LoRA tensors of an int8 file, dequantised, under peft's keys; ValueError if it
    is not one this version can read."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get(INT8_FORMAT_KEY) != INT8_FORMAT:
            raise ValueError(f"{path.name} is not int8 LoRA weights in format {INT8_FORMAT} (format {metadata.get(INT8_FORMAT_KEY)!r})")
        layout = parse_int8_layout(metadata.get(INT8_LAYOUT_KEY, ""))
        values, scales = fh.get_tensor(INT8_VALUES), fh.get_tensor(INT8_SCALES)
    if values.dtype != torch.int8 or scales.dtype != torch.float32 or values.dim() != 1 or scales.dim() != 1:
        raise ValueError(f"{path.name}: expected 1-D int8 values and float32 scales")
    n_values = sum(r * (n_in + n_out) for _, r, n_in, n_out in layout)
    n_scales = sum(2 * r for _, r, _, _ in layout)
    if values.numel() != n_values or scales.numel() != n_scales:
        raise ValueError(f"{path.name}: {values.numel()} values and {scales.numel()} scales, its layout needs {n_values} and {n_scales}")
    tensors: dict[str, torch.Tensor] = {}
    v = s = 0
    for name, r, n_in, n_out in layout:
        q_a = values[v : v + r * n_in].view(r, n_in)
        v += r * n_in
        q_b = values[v : v + n_out * r].view(n_out, r)
        v += n_out * r
        tensors[lora_key(name, "lora_A.weight")] = dequantize_per_rank(q_a, scales[s : s + r], 0)
        tensors[lora_key(name, "lora_B.weight")] = dequantize_per_rank(q_b, scales[s + r : s + 2 * r], 1)
        s += 2 * r
    return tensors
