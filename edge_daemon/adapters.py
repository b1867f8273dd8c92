"""Model artifacts on disk: the base model in `base/` and versioned LoRA adapters in `adapters/v<N>/`.

Adapters are stored in peft's own format, but serving never imports peft: the
LoRA tensors are read from the safetensors file and merged into a copy of the
base weights here, in plain torch.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
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

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edge_daemon.errors import AdapterError, BaseFormatError, ModelError
from edge_daemon.files import fsync_path, fsync_tree, iso, now_iso, replace_atomically, write_json
from edge_daemon.frames import Grid, NormStats, calendar_features, normalise_grid, with_calendar
from edge_daemon.training.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.records import AdapterMeta

log = logging.getLogger(__name__)

# 2: the forecaster predicts the change from the last value through a linear and a transformer path.
BASE_FORMAT = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NORM_FILE = "norm.json"
META_FILE = "meta.json"
POINTER_FILE = "current"
NO_ADAPTER = "none"
# One JSON line per change of what is served (commit, rollback, base only), for reports.
HISTORY_FILE = "history.jsonl"
# Staging dirs older than this are leftovers of a crashed update.
STALE_STAGING_S = 3600.0


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------- base model


@dataclass
class BaseModel:
    """The frozen base forecaster and everything needed to feed it."""

    model: Forecaster  # in eval mode
    cfg: ForecasterConfig
    norm: NormStats  # per channel, in `channels` order
    channels: list[str]  # model order: the forecast channels, then the inputs only
    period_s: float
    residual_scale: np.ndarray  # (C,) float32, typical |residual| per forecast channel in normalised units
    meta: dict[str, Any]  # steps/epochs, data range, losses of the run that produced it
    path: Path
    fingerprint: str  # sha256 prefix of the weights: adapters record which base they were trained on
    # Column of each of `channels` in the raw values fed in (config order); None: already in model order.
    source_columns: np.ndarray | None = None

    @property
    def targets(self) -> list[str]:
        """The forecast channels, in the order of the model's outputs."""
        return self.channels[: self.cfg.n_channels]

    def residual_scale_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.residual_scale, dtype=torch.float32)

    def in_model_order(self, raw: np.ndarray) -> np.ndarray:
        """(..., channels) raw values in config order -> the same in model order."""
        return raw if self.source_columns is None else np.asarray(raw)[..., self.source_columns]

    def inputs(self, grid: Grid) -> Grid:
        """A raw grid (config order) as the model's input columns: normalised channels in model
        order, then the calendar."""
        ordered = Grid(grid.t0, grid.period_s, self.in_model_order(grid.values))
        return with_calendar(normalise_grid(ordered, self.norm), self.cfg.calendar_s)

    def step_inputs(self, t: float, raw: np.ndarray) -> np.ndarray:
        """(n_inputs,) float32 model input of one grid step at time `t` from its raw values (config order)."""
        calendar = calendar_features(np.array([t]), self.cfg.calendar_s)[0]
        return np.concatenate([self.norm.apply(self.in_model_order(raw)), calendar]).astype(np.float32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def save_base(
    directory: Path,
    model: Forecaster,
    norm: NormStats,
    channels: list[str],
    period_s: float,
    residual_scale: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write the base model to `directory` atomically: all of it or none of it.

    Built in a temp dir next to `directory`, fsynced, then renamed into place.
    A directory cannot replace a non-empty one in a single rename, so an old
    base is first moved aside; `load_base` recovers it if we die in between.
    """
    directory = Path(directory)
    cfg = model.cfg
    residual_scale = np.asarray(residual_scale, dtype=np.float32)
    if not (len(channels) == cfg.n_sensors == norm.n_channels and residual_scale.shape[0] == cfg.n_channels):
        raise ModelError(
            f"inconsistent base: {len(channels)} channels, model {cfg.n_sensors} ({cfg.n_channels} forecast), "
            f"norm {norm.n_channels}, residual_scale {residual_scale.shape[0]}"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        # safetensors refuses shared or non-contiguous storage; clone detaches both.
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(
            tmp / CONFIG_FILE,
            {
                "format": BASE_FORMAT,
                "forecaster": cfg.to_dict(),
                "channels": list(channels),  # model order: the forecast ones, then the inputs only
                "inputs_only": list(channels[cfg.n_channels :]),
                "period_s": float(period_s),
                "meta": {"created": now_iso(), **meta},
            },
        )
        write_json(tmp / NORM_FILE, {**norm.to_dict(), "residual_scale": residual_scale.astype(float).tolist()})
        fsync_tree(tmp)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(directory, old)
        os.rename(tmp, directory)
        fsync_path(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved base model to %s (%d parameters)", directory, model.n_params())
    return directory


def _recover_base(directory: Path) -> None:
    """If a save died between moving the old base aside and renaming the new one in, restore the old one."""
    if directory.exists():
        return
    leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers:
        log.warning("restoring base model from interrupted save: %s", leftovers[-1])
        os.rename(leftovers[-1], directory)


def load_base(
    directory: Path, channels: list[str] | None = None, period_s: float | None = None, inputs_only: list[str] | None = None
) -> BaseModel:
    """Load the base model in eval mode; ModelError if missing, corrupt or not made for these
    channels (config order; `inputs_only` of them read but not forecast) and period."""
    directory = Path(directory)
    _recover_base(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise ModelError(f"no base model in {directory} (run `edge-daemon pretrain`)")
    try:
        config = _read_json(directory / CONFIG_FILE)
        if config.get("format") != BASE_FORMAT:
            raise BaseFormatError(
                f"base model in {directory} has format {config.get('format')}, this version reads {BASE_FORMAT}: "
                "retrain it with `edge-daemon pretrain`"
            )
        norm_data = _read_json(directory / NORM_FILE)
        cfg = ForecasterConfig.from_dict(config["forecaster"])
        saved_channels = [str(c) for c in config["channels"]]
        saved_period = float(config["period_s"])
        norm = NormStats.from_dict(norm_data)
        residual_scale = np.asarray(norm_data["residual_scale"], dtype=np.float32)
        meta = dict(config.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ModelError(f"corrupt base model in {directory}: {exc}") from None
    if not (len(saved_channels) == cfg.n_sensors == norm.n_channels and residual_scale.shape[0] == cfg.n_channels):
        raise ModelError(f"corrupt base model in {directory}: channel counts disagree")
    if not (np.isfinite(residual_scale).all() and (residual_scale > 0).all()):
        raise ModelError(f"corrupt base model in {directory}: residual_scale must be finite and > 0")
    source_columns = None
    if channels is not None:
        skipped = set(inputs_only or ())
        wanted = [c for c in channels if c not in skipped] + [c for c in channels if c in skipped]
        if wanted != saved_channels:
            raise ModelError(f"base model in {directory} was trained on channels {saved_channels}, config has {list(channels)}")
        if set(saved_channels[cfg.n_channels :]) != skipped:
            raise ModelError(
                f"base model in {directory} reads {saved_channels[cfg.n_channels:] or 'no channels'} as inputs only, "
                f"config has {sorted(skipped) or 'none'}: retrain it with `edge-daemon pretrain`"
            )
        source_columns = np.array([list(channels).index(c) for c in saved_channels], dtype=np.int64)
    if period_s is not None and not math.isclose(period_s, saved_period, rel_tol=1e-9):
        raise ModelError(f"base model in {directory} was trained at period {saved_period} s, config has {period_s} s")
    model = Forecaster(cfg)
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
        model.load_state_dict(state, strict=True)
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise ModelError(f"corrupt base model weights in {directory}: {exc}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ModelError(f"corrupt base model weights in {directory}: non-finite values")
    model.eval()
    return BaseModel(
        model=model,
        cfg=cfg,
        norm=norm,
        channels=saved_channels,
        period_s=saved_period,
        residual_scale=residual_scale,
        meta=meta,
        path=directory,
        fingerprint=_sha256(directory / WEIGHTS_FILE),
        source_columns=source_columns,
    )


# ---------------------------------------------------------------- adapter store


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
            data = _read_json(path / META_FILE)
            if not isinstance(data, dict):
                raise ValueError("meta.json is not an object")
            meta = AdapterMeta.from_json(data)
            size = sum((path / name).stat().st_size for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE))
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
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not (staging / name).is_file():
                raise AdapterError(f"staging dir {staging} has no {name}: was save_pretrained called on it?")
        with self._locked():
            existing = self._version_dirs()
            number = max(existing, default=0) + 1
            target = self.root / f"v{number}"
            try:
                write_json(staging / META_FILE, replace(meta, created=meta.created or now_iso(), version=number).to_json())
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
            load_lora_state(target.path)  # refuse to point at something we could not serve
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


# ---------------------------------------------------------------- serving merge


def load_lora_state(version_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read peft's adapter_model.safetensors and adapter_config.json without importing peft."""
    version_dir = Path(version_dir)
    try:
        lora_cfg = _read_json(version_dir / ADAPTER_CONFIG_FILE)
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


def _alpha_for(module_name: str, lora_cfg: dict[str, Any]) -> float:
    # Same matching rule as peft.utils.other.get_pattern_key.
    for pattern, alpha in (lora_cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return float(alpha)
    return float(lora_cfg["lora_alpha"])


def merge_lora(model: Forecaster, tensors: dict[str, torch.Tensor], lora_cfg: dict[str, Any]) -> Forecaster:
    """A copy of `model` with W += scale * B @ A merged into every adapted Linear (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).

    Equivalent to peft's `merge_and_unload()`; the input model is untouched.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
        if not match:
            raise AdapterError(f"unexpected tensor {key!r} in adapter")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    merged = copy.deepcopy(model)
    fan_in_fan_out = bool(lora_cfg.get("fan_in_fan_out", False))
    for name, parts in sorted(pairs.items()):
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise AdapterError(f"adapter for {name} lacks lora_A or lora_B")
        try:
            layer = merged.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter targets {name}, which the base model does not have") from None
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"adapter targets {name}, which is not a Linear layer")
        lora_a = parts["lora_A.weight"].to(torch.float32)  # (r, in)
        lora_b = parts["lora_B.weight"].to(torch.float32)  # (out, r)
        r = lora_a.shape[0]  # per-module rank (rank_pattern) is in the shape itself
        alpha = _alpha_for(name, lora_cfg)
        scale = alpha / math.sqrt(r) if lora_cfg.get("use_rslora") else alpha / r
        delta = lora_b @ lora_a  # (out, in)
        if fan_in_fan_out:
            delta = delta.T
        if delta.shape != layer.weight.shape:
            raise AdapterError(f"adapter for {name} has shape {tuple(delta.shape)}, layer has {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight += (delta * scale).to(layer.weight.dtype)
            if "lora_B.bias" in parts:
                if layer.bias is None:
                    raise AdapterError(f"adapter for {name} has a bias but the layer has none")
                layer.bias += (parts["lora_B.bias"].to(torch.float32) * scale).to(layer.bias.dtype)
    if not all(torch.isfinite(p).all() for p in merged.parameters()):
        raise AdapterError("merged weights are not finite")
    merged.eval()
    merged.requires_grad_(False)
    return merged


def serving_model(base: BaseModel, version: AdapterVersion | None) -> Forecaster:
    """The model the daemon scores with: base + `version` merged, or a frozen copy of the base when None.

    AdapterError when `version` was trained on another base (its LoRA deltas fit only that one's
    weights); adapters from before the base was recorded are taken as they are."""
    if version is None:
        model = copy.deepcopy(base.model)
        model.eval()
        model.requires_grad_(False)
        return model
    trained_on = version.meta.base_fingerprint
    if trained_on is not None and trained_on != base.fingerprint:
        raise AdapterError(
            f"adapter v{version.version} was trained on base {trained_on}, the base now is {base.fingerprint}: "
            "it fits only the base it was trained on"
        )
    tensors, lora_cfg = load_lora_state(version.path)
    return merge_lora(base.model, tensors, lora_cfg)
