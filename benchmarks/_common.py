"""Shared pieces of the benchmarks: synthetic sensor regimes, windows, a pretraining loop.

Three coupled channels (temperature-like, vibration-like, current-like) whose
dynamics change with the regime, so a model trained on one forecasts the
other badly until it adapts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_daemon.baselines import fit_ridge
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss


@dataclass(frozen=True)
class Regime:
    period: float  # steps per cycle of the main oscillation
    amp: float  # its amplitude
    offset: float  # level shift of channel 0
    coupling: float  # how strongly channel 2 follows channel 0 (lagged)
    noise: float = 0.05


OLD = Regime(period=24.0, amp=1.0, offset=0.0, coupling=0.8)
NEW = Regime(period=15.0, amp=1.4, offset=0.6, coupling=-0.5)


def series(n_steps: int, regime: Regime, seed: int) -> torch.Tensor:
    """(n_steps, 3) of one regime: an oscillation, its quadrature and a lagged coupled AR channel."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_steps, dtype=torch.float32)
    phase = float(torch.rand(1, generator=g)) * 2 * math.pi
    # Slow amplitude wander keeps windows from being exact copies of each other.
    wander = 1.0 + 0.15 * torch.sin(2 * math.pi * t / (regime.period * 7.3) + phase)
    main = regime.amp * wander * torch.sin(2 * math.pi * t / regime.period + phase)
    quad = regime.amp * wander * torch.cos(2 * math.pi * t / regime.period + phase)
    ar = torch.zeros(n_steps)
    kicks = 0.1 * torch.randn(n_steps, generator=g)
    for i in range(3, n_steps):
        ar[i] = 0.7 * ar[i - 1] + regime.coupling * 0.3 * main[i - 3] + kicks[i]
    x = torch.stack([main + regime.offset, quad, ar], dim=-1)
    return x + regime.noise * torch.randn(n_steps, 3, generator=g)


def windows(x: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """(N, length, C) windows cut from (n_steps, C) with the given stride."""
    return x.unfold(0, length, stride).permute(0, 2, 1).contiguous()


def regime_windows(regime: Regime, n: int, length: int, seed: int, stride: int = 7) -> torch.Tensor:
    """n windows of `length` steps from one long run of `regime`."""
    return windows(series(n * stride + length, regime, seed), length, stride)[:n]


def make_data(window: int, n_train: int = 256, n_val: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Recent windows from the new regime, replayed windows from the old one.

    Validation windows come from later runs (different seeds) than training ones.
    """
    length = window + 1
    return {
        "recent_train": regime_windows(NEW, n_train, length, seed + 1),
        "recent_val": regime_windows(NEW, n_val, length, seed + 2),
        "replay_train": regime_windows(OLD, n_train, length, seed + 3),
        "replay_val": regime_windows(OLD, n_val, length, seed + 4),
    }


def pretrain(model: Forecaster, train: torch.Tensor, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> float:
    """Full training of the base on `train`; returns the last batch loss."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = math.nan
    for _ in range(steps):
        batch_windows = train[torch.randint(0, len(train), (batch,), generator=g)]
        loss = forecast_loss(model, batch_windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def mae(model: torch.nn.Module, data: torch.Tensor, batch: int = 32) -> float:
    """Mean absolute next-step error over every position of (N, T+1, C) windows."""
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for chunk in data.split(batch):
            total += float((model(chunk[:, :-1]) - chunk[:, 1:]).abs().mean()) * len(chunk)
    return total / len(data)


def baseline_models(cfg: ForecasterConfig, train: torch.Tensor) -> dict[str, Forecaster]:
    """Persistence and the ridge autoregression as forecasters of `cfg`'s shape, so they are scored
    by the same loss on the same windows as the models beside them: an untrained forecaster is
    persistence exactly (both its paths start silent), and the ridge fit on `train` (N, L, C)
    windows loads into the linear path as pretraining loads it (every horizon it has)."""
    ridge_model = Forecaster(cfg)
    ridge = fit_ridge(train.numpy().astype(np.float64), lags=cfg.lags, horizons=cfg.horizons)
    if ridge is not None:
        ridge_model.set_linear(torch.as_tensor(ridge.coef, dtype=torch.float32))
        for horizon, coef in ridge.ahead.items():
            ridge_model.set_linear(torch.as_tensor(coef, dtype=torch.float32), horizon)
    return {"persistence": Forecaster(cfg), "ridge": ridge_model}


def run_update(config: Any, reason: str = "requested", since: float | None = None, seed: int = 0) -> Any:
    """One update through the daemon's update path (`training.job._run_update`: store windows, replay, gate,
    commit), run in this process at memory level normal; `since` as the daemon passes it after drift."""
    from edge_daemon.training.records import UpdateJob
    from edge_daemon.training.job import _run_update
    from edge_daemon.training.governor import PlanGovernor
    from edge_daemon.memory.pressure import Level
    from edge_daemon.training.plan import plan_candidates

    governor = PlanGovernor(lambda: Level.NORMAL, plan_candidates(config.train.batch_size, config.train.micro_batch))
    job = UpdateJob("update", reason, since=since, candidates=tuple(governor.start_candidates()), baseline_mb=300.0, budget_mb=16000.0, seed=seed)

    class Sink:
        def put(self, message: Any) -> None:
            pass

    reply = _run_update(config, job, governor, threading.Event(), Sink())
    if reply.version is not None:  # what the daemon does once it serves an accepted version
        from edge_daemon.artifacts.adapters import AdapterStore

        AdapterStore(config.adapters_dir, keep=config.train.keep_versions).make_current(reply.version)
    return reply
