"""Training the base forecaster from scratch: from a CSV, from the replay store, or from a grid.

Owns full training (AdamW on every weight, `forecast_loss`), the residual
scale the anomaly score is measured in, and saving the result with
`artifacts.base.save_base`. Thread counts are the caller's to set.

Over 400 lines on purpose: `pretrain` is one run (prepare the windows, train with
validation, choose on held-out windows what is served, save), and its helpers here
exist only for that run. Reading a CSV is in csv_readings.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edge_daemon.artifacts.base import BaseMeta, BaseModel, save_base
from edge_daemon.baselines import MODEL, RidgeAR, detect_season, held_out_report, make_baselines
from edge_daemon.config import ModelConfig
from edge_daemon.training.csv_readings import read_csv_readings
from edge_daemon.drift.prior import validation_residuals
from edge_daemon.errors import TrainingAborted, TrainingError
from edge_daemon.frames import (
    Grid,
    NormStats,
    Windows,
    build_grid,
    make_windows,
    normalise_grid,
    split_by_time,
    valid_window_starts,
    ValueReference,
    value_reference,
    with_calendar,
)
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss

if TYPE_CHECKING:
    from edge_daemon.config import Config
    from edge_daemon.store import ReplayStore

log = logging.getLogger(__name__)

MIN_TRAIN_WINDOWS = 16
# Baselines fitted without a base (`stand_in_base`): held-out windows their anomaly scale needs
# (a few would give a scale of ~0 on a quantised channel, and every step an anomaly), the floor
# of that scale (normalised units: 1% of the channel's std), and how many windows are built.
STAND_IN_MIN_VAL_WINDOWS = 30
STAND_IN_VAL_FRACTION = 0.2  # the newest fifth held out: a judgement within minutes of a new device's data
STAND_IN_MIN_SCALE = 0.01
STAND_IN_MAX_WINDOWS = 8192
# Windows per forward when evaluating: activations grow with it (256 cost a training worker ~40 MB
# on the default model), speed hardly does past a few tens.
EVAL_BATCH = 32
# Training windows whose residuals fill the hours of the day the held-out ones miss (drift/prior.py).
PRIOR_TRAIN_SAMPLE = 4096
# Periodic validation looks at an even sample of this many windows; the final
# numbers use all of them.
EVAL_SAMPLE = 1024


CALENDAR_S = {"day": 86400.0, "week": 7 * 86400.0}
# A pattern seen once cannot be told from a trend: a calendar input needs this many cycles of data.
MIN_CALENDAR_CYCLES = 2


def calendar_periods(names: list[str], span_s: float) -> tuple[float, ...]:
    """The periods of the configured calendar inputs that `span_s` seconds of data cover often enough."""
    return tuple(CALENDAR_S[name] for name in names if span_s >= MIN_CALENDAR_CYCLES * CALENDAR_S[name])


def horizon_steps(model_cfg: ModelConfig, period_s: float) -> tuple[int, ...]:
    """The configured horizons, or the next step and one hour's worth (at most half a window)."""
    if model_cfg.horizons:
        return tuple(model_cfg.horizons)
    hour = min(max(1, round(3600.0 / period_s)), max(1, model_cfg.window // 2))
    return (1,) if hour == 1 else (1, hour)


def forecaster_config(
    model_cfg: ModelConfig,
    n_channels: int,
    calendar_s: tuple[float, ...] = (),
    period_s: float | None = None,
    n_covariates: int = 0,
) -> ForecasterConfig:
    """The model shape a `[model]` config section describes (horizons need the grid's period):
    `n_channels` forecast, `n_covariates` read only."""
    return ForecasterConfig(
        n_channels=n_channels,
        n_covariates=n_covariates,
        window=model_cfg.window,
        d_model=model_cfg.d_model,
        n_heads=model_cfg.n_heads,
        n_layers=model_cfg.n_layers,
        d_ff=model_cfg.d_ff,
        dropout=model_cfg.dropout,
        reversible=model_cfg.reversible,
        lags=min(model_cfg.ridge_lags, model_cfg.window),
        calendar_s=calendar_s,
        horizons=(1,) if period_s is None else horizon_steps(model_cfg, period_s),
    )


def _lr_at(step: int, total: int, peak: float) -> float:
    # Short linear warm-up, then cosine decay to a tenth of the peak.
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _eval_loss(model: Forecaster, windows: np.ndarray) -> float:
    """Mean forecast loss over (M, T+1, C) normalised windows, in batches."""
    if len(windows) == 0:
        return float("nan")
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(windows), EVAL_BATCH):
            batch = torch.from_numpy(windows[start : start + EVAL_BATCH])
            total += float(forecast_loss(model, batch)) * len(batch)
    return total / len(windows)


def last_step_errors(model: torch.nn.Module, windows: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """(M, C) forecast - actual at the last position of (M, T+1, C) normalised windows, forecast
    `batch_size` windows at a time (a training worker passes its plan's micro-batch: on a long
    window a batch of 32 holds ~100 MB of activations).

    The last position is the one the scorer uses once it holds a full window.
    """
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(windows[start : start + batch_size]))
            forecast = model(batch[:, :-1])[:, -1]  # (B, C): calendar columns are inputs, not forecast
            parts.append((forecast - batch[:, -1, : forecast.shape[-1]]).double().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, windows.shape[-1]))


def residual_scale_of(model: Forecaster, windows: np.ndarray) -> np.ndarray:
    """RMS per channel of last-position residuals over (M, T+1, C) normalised windows,
    exactly the residuals the scorer divides by it."""
    errors = last_step_errors(model, windows)
    rms = np.sqrt((errors**2).sum(axis=0) / max(len(windows), 1))
    # A channel the model predicts perfectly must not make every later wobble an anomaly.
    return np.maximum(rms, 1e-3).astype(np.float32)


def _persistence_loss(windows: np.ndarray, horizons: tuple[int, ...] = (1,)) -> float:
    """Loss of 'a later step = this step' on the positions and horizons `forecast_loss` counts, in
    its measure (mean absolute error): the bar any useful forecaster must clear."""
    if len(windows) == 0:
        return float("nan")
    T = windows.shape[1] - 1
    first = T // 2
    return float(np.mean([np.mean(np.abs(windows[:, first + h :] - windows[:, first : T + 1 - h])) for h in horizons]))


def input_references_of(data: Grid | np.ndarray) -> list[ValueReference | None]:
    """Per channel, the decile reference of the raw training values (None: too few values)."""
    if isinstance(data, Grid):
        raw = np.asarray(data.values, dtype=np.float64)
    else:
        raw = np.asarray(data, dtype=np.float64)
        if raw.ndim == 3:
            raw = raw[:, -1, :]  # each window's last step: every value about once
    references: list[ValueReference | None] = []
    for c in range(raw.shape[1]):
        try:
            references.append(value_reference(raw[:, c]))
        except ValueError:
            references.append(None)
    return references


def _prepare(
    data: Grid | np.ndarray,
    period_s: float,
    length: int,
    val_fraction: float,
    end_times: np.ndarray | None,
    stride: int,
    calendar_s: tuple[float, ...] = (),
) -> tuple[NormStats, Windows, Windows]:
    """Raw grid or windows -> normalisation stats, normalised train and validation windows
    (with calendar columns after the channels when `calendar_s` names periods; grids only)."""
    if isinstance(data, Grid):
        if not math.isclose(data.period_s, period_s, rel_tol=1e-9):
            raise TrainingError(f"grid period {data.period_s} s differs from the configured {period_s} s")
        grid = data
    else:
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            grid = Grid(0.0, period_s, data)
        elif data.ndim == 3:
            if data.shape[1] != length:
                raise TrainingError(f"windows have {data.shape[1]} steps, the model needs {length} (window + 1)")
            if np.isnan(data).any():
                raise TrainingError("windows must not contain NaN")
            norm = NormStats.fit(data)
            times = np.arange(len(data), dtype=np.float64) * period_s if end_times is None else np.asarray(end_times)
            # Without end times, windows are taken as consecutive stride-1 windows in time order.
            train, val = split_by_time(norm.apply(data), times, val_fraction, period_s=period_s)
            return norm, train, val
        else:
            raise TrainingError(f"expected grid values (N, C) or windows (M, T+1, C), got shape {data.shape}")
    norm = NormStats.fit(grid.values)
    windows = make_windows(with_calendar(normalise_grid(grid, norm), calendar_s), length, stride)
    train, val = split_by_time(windows.windows, windows.end_times, val_fraction, period_s=grid.period_s)
    return norm, train, val


def pretrain(
    data: Grid | np.ndarray,
    channels: list[str],
    period_s: float,
    model_cfg: ModelConfig,
    out_dir: Path,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    val_fraction: float | None = None,
    end_times: np.ndarray | None = None,
    stride: int = 1,
    seed: int = 0,
    progress: bool = False,
    gradient_checkpointing: bool = False,
    should_stop: Callable[[], bool] | None = None,
    meta: BaseMeta | None = None,
    inputs_only: Sequence[str] = (),
) -> BaseMeta:
    """Train a base forecaster on raw (unnormalised) data and save it to `out_dir` with `save_base`.

    `data` is a `Grid` (preferred: its times date the model), grid values
    (N, C), or windows (M, window + 1, C) in time order (`end_times` optional),
    with one column per channel in `channels` order; `inputs_only` of them are
    read but not forecast.
    Length of training: `steps`, else `epochs` over the training windows, else
    `model_cfg.pretrain_steps`. The best validation checkpoint is kept.
    `should_stop` is polled every step; True raises TrainingAborted and
    nothing is saved. Returns the run's metrics (also stored in the base's meta).
    """
    started = time.monotonic()
    unknown = [name for name in inputs_only if name not in channels]
    if unknown or len(inputs_only) >= len(channels):
        raise TrainingError(f"inputs_only must name some, not all, of the channels {list(channels)}; got {list(inputs_only)}")
    width = np.shape(data.values if isinstance(data, Grid) else data)[-1]
    if width != len(channels):
        raise TrainingError(f"data has {width} channels, config names {len(channels)}")
    # Model order: the forecast channels, then the inputs only (their columns follow the forecast ones).
    channels, data = _in_model_order(data, list(channels), set(inputs_only))
    # Calendar inputs need times: a grid has them, bare windows do not.
    calendar_s = calendar_periods(model_cfg.calendar, len(data) * period_s) if isinstance(data, Grid) else ()
    n_channels = len(channels) - len(inputs_only)  # forecast
    n_sensors = len(channels)
    fcfg = forecaster_config(model_cfg, n_channels, calendar_s, period_s, n_covariates=len(inputs_only))
    batch_size = batch_size or model_cfg.pretrain_batch_size
    lr = lr or model_cfg.pretrain_lr
    val_fraction = val_fraction or model_cfg.pretrain_val_fraction
    norm, train, val = _prepare(data, period_s, fcfg.window + 1, val_fraction, end_times, stride, calendar_s)
    if len(train.windows) < MIN_TRAIN_WINDOWS or len(val.windows) < 1:
        raise TrainingError(
            f"not enough data to train a base model: {len(train.windows)} training and {len(val.windows)} "
            f"validation windows of {fcfg.window + 1} gap-free steps (need {MIN_TRAIN_WINDOWS} and 1)"
        )
    if steps is None:
        steps = math.ceil(epochs * len(train.windows) / batch_size) if epochs is not None else model_cfg.pretrain_steps
    steps = max(1, steps)

    # The yardstick: what a user gets for free, fitted on the same training windows (and judged
    # below on the same held-out ones). The model's linear path starts from the ridge fit.
    season = model_cfg.season_steps or _detected_season(data, norm, model_cfg.season_max_steps, n_channels)
    baselines = make_baselines(train.windows[..., :n_sensors], season, fcfg.lags, fcfg.horizons, n_channels)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Forecaster(fcfg)
    ridge = next((b for b in baselines if isinstance(b, RidgeAR)), None)
    if ridge is not None:
        model.set_linear(torch.as_tensor(ridge.coef, dtype=torch.float32))
        for horizon, coef in ridge.ahead.items():
            model.set_linear(torch.as_tensor(coef, dtype=torch.float32), horizon)
    model.gradient_checkpointing = gradient_checkpointing
    # The linear path is a penalised fit already: no weight decay pulls it towards persistence.
    linear = set(model.linear.parameters()) | set(model.far_linear.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p not in linear]}, {"params": list(linear), "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), weight_decay=0.01,
    )  # fmt: skip
    eval_every = max(50, steps // 10)
    val_sample = val.windows[np.linspace(0, len(val.windows) - 1, min(EVAL_SAMPLE, len(val.windows))).astype(int)]
    # Step 0 is a candidate: training is kept only where it beats the linear path on held-out windows.
    best_loss, best_step, best_state = _eval_loss(model, val_sample), 0, copy.deepcopy(model.state_dict())
    order = rng.permutation(len(train.windows))
    cursor = 0
    train_loss = float("nan")

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]pretrain"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        bar.start()
        task = bar.add_task("pretrain", total=steps, loss=float("nan"), val=float("nan"))
    try:
        for step in range(steps):
            if should_stop is not None and should_stop():
                raise TrainingAborted(f"base-model training stopped at step {step} of {steps}")
            # Next batch of a shuffled pass over the training windows.
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(train.windows)), 0
            batch = torch.from_numpy(train.windows[order[cursor : cursor + batch_size]])  # (B, T+1, C)
            cursor += batch_size
            # Forward, backward, clipped step at the scheduled learning rate.
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            loss = forecast_loss(model, batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            train_loss = 0.9 * train_loss + 0.1 * loss_value if math.isfinite(train_loss) else loss_value
            del batch, loss
            # Periodic validation; keep the best weights seen.
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                val_loss = _eval_loss(model, val_sample)
                if val_loss < best_loss:
                    best_loss, best_step, best_state = val_loss, step + 1, copy.deepcopy(model.state_dict())
                log.debug("pretrain step %d/%d: train %.4f val %.4f", step + 1, steps, train_loss, val_loss)
                if bar is not None:
                    bar.update(task, val=val_loss)
            if bar is not None:
                bar.update(task, advance=1, loss=train_loss)
    finally:
        if bar is not None:
            bar.stop()

    model.load_state_dict(best_state)
    model.eval()
    val_loss = _eval_loss(model, val.windows)
    residual_scale = residual_scale_of(model, val.windows)
    # A model that loses to a baseline is kept (updates start from it) but not served: the
    # daemon serves the best baseline until a model beats it.
    val_errors = last_step_errors(model, val.windows)
    held_out = held_out_report(baselines, val.windows[..., :n_sensors], val_errors, n_channels)
    # Where residual drift starts from (drift/prior.py): the held-out residuals, and an even sample
    # of the training windows' for the hours of the day the held-out ones miss.
    sample = np.linspace(0, len(train.windows) - 1, min(PRIOR_TRAIN_SAMPLE, len(train.windows))).astype(int)
    validation = validation_residuals(
        val_errors, val.end_times, train_errors=last_step_errors(model, train.windows[sample]),
        train_end_times=train.end_times[sample], timed=isinstance(data, Grid) or end_times is not None,
    )  # fmt: skip
    first_time = float(train.end_times.min()) - fcfg.window * period_s if len(train.end_times) else None
    metrics: BaseMeta = {
        "steps": steps,
        "best_step": best_step,
        "epochs": round(steps * batch_size / len(train.windows), 3),
        "batch_size": batch_size,
        "lr": lr,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "persistence_val_loss": _persistence_loss(val.windows[..., :n_channels], fcfg.horizons),
        "horizons": list(fcfg.horizons),
        "calendar_s": list(calendar_s),
        "baselines": [b.to_dict() for b in baselines],
        "held_out": held_out,
        "season_steps": season,
        "residual_scale": residual_scale.tolist(),
        # What input drift is judged against (drift/reference.py): deciles of the raw data.
        "input_reference": input_references_of(data),
        **({} if validation is None else {"validation_residuals": validation}),
        "train_windows": len(train.windows),
        "val_windows": len(val.windows),
        "n_params": model.n_params(),
        "data_start": first_time,
        "data_end": float(val.end_times.max()),
        "seconds": round(time.monotonic() - started, 2),
    }
    save_base(Path(out_dir), model, norm, list(channels), period_s, residual_scale, {**(meta or {}), **metrics})
    metrics["path"] = str(out_dir)
    log.info(
        "base model trained in %.1f s: val loss %.4f (persistence %.4f), %d parameters; one-step MAE on held-out windows: %s",
        metrics["seconds"],
        val_loss,
        metrics["persistence_val_loss"],
        metrics["n_params"],
        ", ".join(f"{name} {mae:.4g}" for name, mae in held_out["mae"].items()),
    )
    if held_out["serve"] != MODEL:
        log.warning(
            "the base model loses to %s on held-out windows (one-step MAE %.4g vs %.4g): the daemon serves %s "
            "until a model beats it",
            held_out["serve"], held_out["mae"][held_out["serve"]], held_out["mae"][MODEL], held_out["serve"],
        )  # fmt: skip
    return metrics


def stand_in_base(
    grid: Grid,
    channels: list[str],
    model_cfg: ModelConfig,
    *,
    inputs_only: Sequence[str] = (),
    val_fraction: float | None = None,
) -> BaseModel:
    """A base of baselines alone, fitted on a raw grid (config order) with no model trained: what
    the daemon serves while it has no base (a new device, or a damaged base moved aside).

    Persistence, seasonal naive where a season shows and the ridge autoregression, fitted and
    judged held-out as `pretrain` fits and judges them; the best is served. The normalisation
    and the anomaly scale (the served baseline's held-out RMS error, at least
    STAND_IN_MIN_SCALE) come from the same data. Windows are taken every few steps so that at
    most about STAND_IN_MAX_WINDOWS are built: it runs in the daemon's own process.
    TrainingError when the grid has too few gap-free windows for a held-out judgement.
    """
    config_order = list(channels)
    channels, ordered = _in_model_order(grid, config_order, set(inputs_only))
    assert isinstance(ordered, Grid)
    n_channels = len(channels) - len(inputs_only)
    fcfg = forecaster_config(model_cfg, n_channels, (), grid.period_s, n_covariates=len(inputs_only))
    stride = max(1, math.ceil(len(ordered.values) / STAND_IN_MAX_WINDOWS))
    norm, train, val = _prepare(ordered, grid.period_s, fcfg.window + 1, val_fraction or STAND_IN_VAL_FRACTION, None, stride)
    if len(train.windows) < MIN_TRAIN_WINDOWS or len(val.windows) < STAND_IN_MIN_VAL_WINDOWS:
        raise TrainingError(
            f"not enough data to fit the baselines: {len(train.windows)} training and {len(val.windows)} "
            f"validation windows of {fcfg.window + 1} gap-free steps (need {MIN_TRAIN_WINDOWS} and {STAND_IN_MIN_VAL_WINDOWS})"
        )
    season = model_cfg.season_steps or _detected_season(ordered, norm, model_cfg.season_max_steps, n_channels)
    baselines = make_baselines(train.windows, season, fcfg.lags, fcfg.horizons, n_channels)
    held_out = held_out_report(baselines, val.windows, None, n_channels)
    residual_scale = np.maximum(np.asarray(held_out["rms"][held_out["serve"]], dtype=np.float32), STAND_IN_MIN_SCALE)
    described = json.dumps([b.to_dict() for b in baselines], sort_keys=True) + json.dumps(norm.to_dict(), sort_keys=True)
    meta: BaseMeta = {
        "source": "store",
        "baselines": [b.to_dict() for b in baselines],
        "held_out": held_out,
        "season_steps": season,
        "residual_scale": residual_scale.tolist(),
        "input_reference": input_references_of(ordered),
        "train_windows": len(train.windows),
        "val_windows": len(val.windows),
        "data_start": float(train.end_times.min()) - fcfg.window * grid.period_s,
        "data_end": float(val.end_times.max()),
    }
    return BaseModel(
        model=None,
        cfg=fcfg,
        norm=norm,
        channels=channels,
        period_s=grid.period_s,
        residual_scale=residual_scale,
        meta=meta,
        path=Path(),
        fingerprint="baselines-" + hashlib.sha256(described.encode()).hexdigest()[:16],
        source_columns=None if channels == config_order else np.array([config_order.index(c) for c in channels], dtype=np.int64),
    )


def _in_model_order(
    data: Grid | np.ndarray, channels: list[str], inputs_only: set[str]
) -> tuple[list[str], Grid | np.ndarray]:
    """The channels and the data's columns reordered: the forecast channels, then the inputs only."""
    order = [i for i, c in enumerate(channels) if c not in inputs_only] + [i for i, c in enumerate(channels) if c in inputs_only]
    if order == list(range(len(channels))):
        return channels, data
    ordered = [channels[i] for i in order]
    if isinstance(data, Grid):
        return ordered, Grid(data.t0, data.period_s, data.values[:, order])
    return ordered, np.asarray(data)[..., order]


def _detected_season(data: Grid | np.ndarray, norm: NormStats, max_steps: int, n_channels: int) -> int | None:
    """The season of the forecast channels (the first `n_channels`) of a grid's values (windows
    carry too little history to see one); None for windows."""
    values = data.values if isinstance(data, Grid) else np.asarray(data)
    if values.ndim != 2:
        return None
    return detect_season(norm.apply(np.asarray(values, dtype=np.float64))[:, :n_channels], max_steps)


# ---------------------------------------------------------------- data sources


def pretrain_from_csv(
    csv_path: Path,
    channels: list[str],
    period_s: float,
    max_fill_steps: int,
    model_cfg: ModelConfig,
    out_dir: Path,
    **kwargs: Any,
) -> BaseMeta:
    """Grid a CSV (wide or long, see `read_csv_readings`) and `pretrain` on it; kwargs go to `pretrain`."""
    ts, channel_idx, values = read_csv_readings(Path(csv_path), channels)
    if ts.size == 0:
        raise TrainingError(f"{csv_path}: no readings of the configured channels")
    grid = build_grid(ts, channel_idx, values, len(channels), period_s, max_fill_steps)
    meta: BaseMeta = {"source": f"csv:{Path(csv_path).name}", **kwargs.pop("meta", {})}
    return pretrain(grid, channels, period_s, model_cfg, out_dir, meta=meta, **kwargs)


def pretrain_from_store(
    store: ReplayStore,
    channels: list[str],
    period_s: float,
    max_fill_steps: int,
    model_cfg: ModelConfig,
    out_dir: Path,
    *,
    since: float | None = None,
    until: float | None = None,
    min_windows: int | None = None,
    **kwargs: Any,
) -> BaseMeta:
    """Train the base from the replay store's readings (how a device bootstraps its own base).

    TrainingError if fewer than `min_windows` (default `model_cfg.bootstrap_min_windows`)
    gap-free windows are available; kwargs go to `pretrain`.
    """
    ts, channel_idx, values = store.read(since, until)
    grid = build_grid(ts, channel_idx, values, len(channels), period_s, max_fill_steps)
    available = count_windows(grid, model_cfg.window + 1)
    needed = model_cfg.bootstrap_min_windows if min_windows is None else min_windows
    if available < needed:
        raise TrainingError(f"not enough data in the store to train a base model: {available} windows, need {needed}")
    meta: BaseMeta = {"source": "store", **kwargs.pop("meta", {})}
    return pretrain(grid, channels, period_s, model_cfg, out_dir, meta=meta, **kwargs)


def count_windows(grid: Grid, length: int) -> int:
    """Gap-free windows of `length` steps in the grid (the bootstrap trigger compares this to its minimum)."""
    return len(valid_window_starts(grid.values, length))


def pretrain_from_config(
    config: Config,
    csv_path: Path | None = None,
    store: ReplayStore | None = None,
    **kwargs: Any,
) -> BaseMeta:
    """What `edge-daemon pretrain --config PATH [--data CSV]` runs: train into `config.base_dir`.

    From `csv_path` when given, else from `store` (opened from the config when None).
    """
    common = (config.channels.names, config.channels.period_s, config.channels.max_fill_steps, config.model, config.base_dir)
    kwargs.setdefault("inputs_only", config.channels.inputs_only)
    if csv_path is not None:
        return pretrain_from_csv(csv_path, *common, **kwargs)
    if store is not None:
        return pretrain_from_store(store, *common, **kwargs)
    from edge_daemon.store import ReplayStore

    with ReplayStore(config.store_path, config.store, config.channels.names) as opened:
        return pretrain_from_store(opened, *common, **kwargs)
