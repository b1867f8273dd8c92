"""The base model on disk in `base/`: weights, config and normalisation, written all or nothing,
and read back checked against the config, with the fingerprint adapters record.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_daemon.baselines import BaselineJson, HeldOut

from edge_daemon.artifacts.files import damaged_files, fsync_path, fsync_tree, read_json, sha256_of, write_json
from edge_daemon.times import now_iso
from edge_daemon.errors import BaseDamagedError, BaseFormatError, ModelError
from edge_daemon.frames import Grid, NormStats, ValueReference, calendar_features, normalise_grid, with_calendar
from edge_daemon.model import Forecaster, ForecasterConfig

if TYPE_CHECKING:
    from edge_daemon.drift.prior import ValidationResiduals

log = logging.getLogger(__name__)

# 2: the forecaster predicts the change from the last value through a linear and a transformer path.
BASE_FORMAT = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NORM_FILE = "norm.json"


class BaseMeta(TypedDict, total=False):
    """The `meta` of a base's config.json: where it came from and how its pretraining went
    (`pretrain.pretrain` writes it; a base from an older writer may lack any of it). `pretrain`
    returns the same, with `path` added: where it saved the base."""

    created: str  # iso8601, added by save_base
    source: str  # "csv:<file>" or "store"
    steps: int
    best_step: int  # the step whose weights were kept (the best validation loss)
    epochs: float
    batch_size: int
    lr: float
    train_loss: float
    val_loss: float
    persistence_val_loss: float
    horizons: list[int]
    calendar_s: list[float]
    baselines: list[BaselineJson]  # what is served while the model does not beat them
    held_out: HeldOut  # the model against them on held-out windows
    season_steps: int | None
    residual_scale: list[float]
    input_reference: list[ValueReference | None]  # per channel: what input drift is judged against
    validation_residuals: ValidationResiduals  # held-out |residual| per forecast channel: where residual drift starts from
    train_windows: int
    val_windows: int
    n_params: int
    data_start: float | None
    data_end: float
    seconds: float
    path: str  # pretrain's return value only


@dataclass
class BaseModel:
    """The frozen base forecaster and everything needed to feed it."""

    # In eval mode. None in a stand-in of baselines alone (`pretrain.stand_in_base`), served while
    # no base exists; such a base is never adapted, saved or loaded.
    model: Forecaster | None
    cfg: ForecasterConfig
    norm: NormStats  # per channel, in `channels` order
    channels: list[str]  # model order: the forecast channels, then the inputs only
    period_s: float
    residual_scale: np.ndarray  # (C,) float32, typical |residual| per forecast channel in normalised units
    meta: BaseMeta  # steps/epochs, data range, losses of the run that produced it
    path: Path
    fingerprint: str  # sha256 prefix of the weights: adapters record which base they were trained on
    # Column of each of `channels` in the raw values fed in (config order); None: already in model order.
    source_columns: np.ndarray | None = None

    @property
    def stand_in(self) -> bool:
        """A stand-in of baselines alone: no model forecasts."""
        return self.model is None

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


def save_base(
    directory: Path,
    model: Forecaster,
    norm: NormStats,
    channels: list[str],
    period_s: float,
    residual_scale: np.ndarray,
    meta: BaseMeta,
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
        write_json(tmp / NORM_FILE, {**norm.to_dict(), "residual_scale": residual_scale.astype(float).tolist()})
        write_json(
            tmp / CONFIG_FILE,
            {
                "format": BASE_FORMAT,
                "forecaster": cfg.to_dict(),
                "channels": list(channels),  # model order: the forecast ones, then the inputs only
                "inputs_only": list(channels[cfg.n_channels :]),
                "period_s": float(period_s),
                "meta": {"created": now_iso(), **meta},
                # Checked at every load: a file damaged on the card is refused, never served.
                "sha256": {name: sha256_of(tmp / name) for name in (WEIGHTS_FILE, NORM_FILE)},
            },
        )
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
        config = read_json(directory / CONFIG_FILE)
        if config.get("format") != BASE_FORMAT:
            raise BaseFormatError(
                f"base model in {directory} has format {config.get('format')}, this version reads {BASE_FORMAT}: "
                "retrain it with `edge-daemon pretrain`"
            )
        recorded = config.get("sha256")  # absent in a base saved before they were recorded
        recorded = {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}
        if damaged := damaged_files(directory, recorded):
            raise BaseDamagedError(f"base model in {directory} is damaged: {', '.join(damaged)} no longer match their sha256")
        norm_data = read_json(directory / NORM_FILE)
        cfg = ForecasterConfig.from_dict(config["forecaster"])
        saved_channels = [str(c) for c in config["channels"]]
        saved_period = float(config["period_s"])
        norm = NormStats.from_dict(norm_data)
        residual_scale = np.asarray(norm_data["residual_scale"], dtype=np.float32)
        meta: BaseMeta = dict(config.get("meta", {}))
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
        # The weights' sha256, read once: checked above when the base recorded it.
        fingerprint=(recorded.get(WEIGHTS_FILE) or sha256_of(directory / WEIGHTS_FILE))[:16],
        source_columns=source_columns,
    )
