"""The serving rule: completed grid step -> forecast, residual and anomaly score.

`Scorer` keeps a rolling window of normalised steps, runs the serving model
(base with the current adapter merged in) and every baseline once per
completed step, and serves per channel whichever forecasts best over the
recent steps (`ServingRule`). `forecast_windows` is the model's forward rule,
shared with the offline replay (scoring/replay.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge_daemon.artifacts.base import BaseModel
from edge_daemon.baselines import MODEL, Baseline, BaselineJson, HeldOut, Persistence, baselines_from_dict
from edge_daemon.model import Forecaster, anomaly_score
from edge_daemon.control.replies import ServingComparison

if TYPE_CHECKING:
    from edge_daemon.config import OutputsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HorizonForecast:
    """The forecast of the step `steps` ahead, made at one scored step."""

    steps: int
    t: float  # the time forecast
    forecast: np.ndarray  # (C,) raw units
    by_channel: tuple[str, ...]  # who made each channel's value: "model" or a baseline's name

    @property
    def by(self) -> str:
        """The one forecaster behind every channel, or "mixed"."""
        return _label(list(self.by_channel))


@dataclass(frozen=True)
class ScoreResult:
    """Scoring of one grid step: how well it was forecast, and the forecast of the next one."""

    t: float  # time of the step just scored
    actual: np.ndarray  # (C,) raw values of step t, forecast channels (model order)
    forecast_t: float  # time the forecast is for (t + period)
    forecast: np.ndarray  # (C,) raw units, forecast of step forecast_t
    residual: np.ndarray | None  # (C,) normalised served forecast - actual at t; None without a forecast for t
    score: float | None  # anomaly score at t (~1 normal); None without a forecast for t
    anomaly: bool  # score above the threshold
    model_version: int | None  # adapter version of the model whose forecast for t is scored here (None: base alone)
    forecast_version: int | None = None  # adapter version of the model behind `forecast`
    served_by: str | None = None  # who made the scored forecast for t: "model", a baseline's name, or "mixed"
    forecast_by: str = MODEL  # who made `forecast` ("mixed": see forecast_by_channel)
    forecast_by_channel: tuple[str, ...] = ()
    residuals: dict[str, np.ndarray] | None = None  # every forecaster's residual at t: the live comparison
    horizons: tuple[HorizonForecast, ...] = ()  # the further horizons' forecasts made at t
    # steps -> every forecaster's residual at t of its forecast made `steps` earlier (normalised)
    horizon_residuals: dict[int, dict[str, np.ndarray]] | None = None

    @property
    def model_residual(self) -> np.ndarray | None:
        """(C,) the model's own residual at t: drift is judged on it, whoever is served."""
        return self.residuals.get(MODEL) if self.residuals else None


@dataclass(frozen=True)
class ServingRule:
    """Which forecaster's forecasts are served: the model, or the best of the model and the baselines
    by mean |error| over the last `compare_steps` scored steps (held-out: each forecast is made
    before its step arrives). A switch needs `margin` better than the one served."""

    mode: str = "best"  # "best" | "model"
    compare_steps: int = 600
    margin: float = 0.05


def serving_rule(outputs: OutputsConfig) -> ServingRule:
    """The serving rule `[outputs]` configures."""
    return ServingRule(mode=outputs.serve, compare_steps=outputs.compare_steps, margin=outputs.switch_margin)


class _Tally:
    """Per channel, the mean |residual| of a forecaster over the last `size` steps."""

    def __init__(self, size: int, channels: int) -> None:
        self.values: deque[np.ndarray] = deque(maxlen=size)
        self.total = np.zeros(channels)

    def add(self, value: np.ndarray) -> None:
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]
        self.values.append(value)
        self.total += value

    @property
    def mean(self) -> np.ndarray:
        return self.total / len(self.values) if self.values else np.full(len(self.total), math.inf)


class Scorer:
    """Scores every completed grid step with the served forecaster.

    Keeps a ring of normalised steps (the model's window, or a whole season for
    seasonal naive, whichever is longer). A step with a NaN channel or a skipped
    step (a gap) clears the history, as gaps split training windows. Forecasts
    start once `min_history` consecutive steps are buffered. Every step the
    model and each baseline forecast the next one; what is served (published,
    scored for anomalies) follows `ServingRule`, starting from the choice made
    on held-out windows when the model was trained (`held_out["serve"]`).

    Without a model (`merged_model` None: a stand-in base of baselines alone, while no base
    exists) the baselines alone forecast and the best of them is served; the first of them
    (persistence) stands where the model would: what a missing forecast falls back to.
    """

    def __init__(
        self,
        base: BaseModel,
        merged_model: Forecaster | None,
        anomaly_threshold: float,
        min_history: int | None = None,
        version: int | None = None,
        baselines: list[Baseline] | None = None,
        held_out: HeldOut | None = None,
        rule: ServingRule | None = None,
    ) -> None:
        self.base = base
        self.window = base.cfg.window
        self.min_history = self.window if min_history is None else int(min_history)
        if not 1 <= self.min_history <= self.window:
            raise ValueError(f"min_history must be in [1, {self.window}], got {min_history}")
        self.anomaly_threshold = float(anomaly_threshold)
        self.rule = rule or ServingRule()
        self._lock = threading.Lock()
        self._model = merged_model.eval() if merged_model is not None else None
        self._version = version
        if baselines is None:
            baselines = baselines_of(base.meta.get("baselines"))
        # Whose forecasts every channel falls back to, and whose record the comparison counts.
        self._anchor = MODEL if merged_model is not None else baselines[0].name
        # Serve the best by the comparison (baselines alone have no model to pin).
        self._best = self.rule.mode == "best" or merged_model is None
        self._set_forecasters(baselines, held_out if held_out is not None else base.meta.get("held_out"))
        self._capacity = max([self.window] + [b.history_steps for b in self._baselines])
        # Each step is written twice, at i and i + capacity, so the newest `capacity` steps are always
        # one contiguous slice: no copy of the whole buffer per step. A row is the model's input:
        # the normalised channels (the forecast ones, then the inputs only), then the calendar.
        self._ring = np.zeros((2 * self._capacity, base.cfg.n_inputs), dtype=np.float32)
        self._next = 0
        self._filled = 0
        self._last_t: float | None = None
        self._pending: dict[str, np.ndarray] = {}  # name -> (C,) normalised forecast of the next step
        self._pending_version: int | None = None
        self._pending_served: list[str] = []
        self._fresh_tallies = False
        # Further horizons: steps ahead -> grid step index forecast -> forecaster -> (C,) normalised.
        self._far = tuple(base.cfg.horizons[1:])
        self._far_pending: dict[int, dict[int, dict[str, np.ndarray]]] = {h: {} for h in self._far}

    def _set_forecasters(self, baselines: list[Baseline], held_out: HeldOut | None) -> None:
        self._baselines = list(baselines)
        names = ([MODEL] if self._model is not None else []) + [b.name for b in self._baselines]
        n = self.base.cfg.n_channels  # forecast channels
        self._tallies = {name: _Tally(self.rule.compare_steps, n) for name in names}
        scale = self.base.residual_scale.astype(np.float32)
        rms: dict[str, list[float]] = held_out.get("rms", {}) if held_out else {}
        self._scales = {name: torch.as_tensor(np.maximum(np.asarray(rms.get(name, scale), np.float32), 1e-6)) for name in names}
        if self._model is not None:
            self._scales[MODEL] = self.base.residual_scale_tensor()
        choice = held_out.get("serve", self._anchor) if held_out else self._anchor
        # Per channel: a baseline may forecast one channel best and the model another.
        served = choice if self._best and choice in names else self._anchor
        self._served = [served] * n
        self._switches = 0
        # Each further horizon is compared and served on its own, starting from the next step's choice.
        self._far_tallies = {h: {name: _Tally(self.rule.compare_steps, n) for name in names} for h in self.base.cfg.horizons[1:]}
        self._far_served = {h: list(self._served) for h in self.base.cfg.horizons[1:]}

    @property
    def version(self) -> int | None:
        return self._version

    @property
    def model(self) -> Forecaster | None:
        """The merged model being served (None: baselines alone)."""
        with self._lock:
            return self._model

    @property
    def served(self) -> str:
        """Whose forecasts are served now: "model" or a baseline's name, "mixed" when channels differ."""
        return _label(self._served)

    @property
    def served_by_channel(self) -> dict[str, str]:
        return dict(zip(self.base.targets, self._served, strict=True))

    def comparison(self) -> ServingComparison:
        """Live mean |error| (normalised units) of each forecaster over the comparison window."""
        with self._lock:
            return {
                "served": _label(self._served),
                "served_by_channel": self.served_by_channel,
                "mode": self.rule.mode,
                "steps_compared": len(self._tallies[self._anchor].values),
                "baselines_only": self._model is None,
                # Mean over channels, then per channel.
                "mae": {name: (float(t.mean.mean()) if t.values else None) for name, t in self._tallies.items()},
                "mae_by_channel": {name: (t.mean.tolist() if t.values else None) for name, t in self._tallies.items()},
                "switches": self._switches,
                "horizons": {
                    str(h): {
                        "served_by_channel": dict(zip(self.base.targets, self._far_served[h], strict=True)),
                        "steps_compared": len(tallies[self._anchor].values),
                        "mae": {name: (float(t.mean.mean()) if t.values else None) for name, t in tallies.items()},
                    }
                    for h, tallies in self._far_tallies.items()
                },
            }

    def swap_model(
        self, merged_model: Forecaster, version: int | None = None, baselines: list[Baseline] | None = None,
        held_out: HeldOut | None = None,
    ) -> None:  # fmt: skip
        """Serve a new merged model from the next step on; a step being scored finishes with the old one.

        The live comparison starts again: the new model's record is its own. `baselines` refitted
        with the update replace the old ones; `held_out` is the update's held-out comparison.
        """
        if self._model is None:
            raise ValueError("a scorer of baselines alone has no model to swap: it is replaced once a base exists")
        merged_model.eval()
        with self._lock:
            self._model = merged_model
            self._version = version
            new = baselines if baselines is not None else self._baselines
            fits = max([self.window] + [b.history_steps for b in new]) <= self._capacity
            self._set_forecasters(new if fits else self._baselines, held_out)
            self._fresh_tallies = True  # the next residuals are of forecasts made before the swap
            for pending in self._far_pending.values():
                pending.clear()  # the old model's forecasts of later steps are not the new one's record
        log.info("scoring with adapter %s; serving %s", f"v{version}" if version is not None else "none (base model)", self.served)

    def reset(self) -> None:
        self._filled = 0
        self._last_t = None
        self._pending = {}
        for pending in self._far_pending.values():
            pending.clear()

    def _history(self, steps: int, channels_only: bool = False) -> np.ndarray:
        """The newest `steps` buffered steps, oldest first (a view); the sensor channels alone
        (without the calendar) if asked."""
        end = self._next + self._capacity
        return self._ring[end - steps : end, : self.base.cfg.n_sensors if channels_only else None]

    def _choose(self, tallies: dict[str, _Tally], served: list[str], steps: int = 1) -> None:
        """Per channel, switch `served` to the forecaster with the lowest mean |error| in `tallies`."""
        compared = len(tallies[self._anchor].values)
        if not self._best or compared < self.rule.compare_steps:
            return
        means = {name: t.mean for name, t in tallies.items() if len(t.values) == compared}
        for c, channel in enumerate(self.base.targets):
            best = min(means, key=lambda name: means[name][c])
            current = means[served[c]][c] if served[c] in means else math.inf
            if best != served[c] and means[best][c] < (1.0 - self.rule.margin) * current:
                log.info("%s, %d step(s) ahead: serving %s instead of %s: mean |error| %.4g vs %.4g over %d steps",
                         channel, steps, best, served[c], means[best][c], current, compared)  # fmt: skip
                served[c] = best
                self._switches += 1

    def add_step(self, t: float, values: np.ndarray) -> ScoreResult | None:
        """Score the step at time `t` (raw values of every channel in config order, NaN allowed);
        None while there is not enough history."""
        with self._lock:
            model, version = self._model, self._version
            raw = np.asarray(values, dtype=np.float64)
            assert raw.shape == (len(self.base.channels),), f"expected {len(self.base.channels)} values, got {raw.shape}"
            period = self.base.period_s
            contiguous = self._last_t is not None and abs(t - (self._last_t + period)) < 0.5 * period
            if not contiguous:
                self.reset()
            if np.isnan(raw).any():
                self.reset()
                return None
            self._last_t = t
            step = self.base.step_inputs(t, raw)  # (n_inputs,)
            n = self.base.cfg.n_channels
            x = step[:n]  # (C,) the normalised forecast channels

            # Residuals of the forecasts made for this step, and the live comparison.
            residuals = {name: (f - x).astype(np.float32) for name, f in self._pending.items()}
            anchor = self._anchor
            if anchor in residuals and not self._fresh_tallies:
                for name, r in residuals.items():
                    if name in self._tallies:
                        self._tallies[name].add(np.abs(r).astype(np.float64))
                self._choose(self._tallies, self._served)
            self._fresh_tallies = False
            # Each channel's residual is its served forecaster's (the model's where that one is gone).
            scored = [name if name in residuals else anchor for name in self._pending_served] if anchor in residuals else None
            residual = score = None
            anomaly = False
            if scored is not None:
                columns = range(len(scored))
                residual = np.array([residuals[name][c] for c, name in zip(columns, scored, strict=True)], dtype=np.float32)
                scale = torch.stack([self._scales.get(name, self._scales[anchor])[c] for c, name in zip(columns, scored, strict=True)])
                score = float(anomaly_score(torch.from_numpy(residual), scale))
                anomaly = score > self.anomaly_threshold
            scored_version = self._pending_version
            # The further horizons' forecasts made for this step, each compared on its own.
            k = round(t / period)
            horizon_residuals: dict[int, dict[str, np.ndarray]] = {}
            for steps in self._far:
                made = self._far_pending[steps].pop(k, None)
                if made is None:
                    continue
                horizon_residuals[steps] = {name: (f - x).astype(np.float32) for name, f in made.items()}
                tallies = self._far_tallies[steps]
                for name, r in horizon_residuals[steps].items():
                    if name in tallies:
                        tallies[name].add(np.abs(r).astype(np.float64))
                self._choose(tallies, self._far_served[steps], steps)

            # Append to the ring.
            self._ring[self._next] = step
            self._ring[self._next + self._capacity] = step
            self._next = (self._next + 1) % self._capacity
            self._filled = min(self._filled + 1, self._capacity)
            if self._filled < self.min_history:
                self._pending = {}
                return None

            pending: dict[str, np.ndarray] = {}
            far: list[dict[str, np.ndarray]] = [{} for _ in self._far]
            if model is not None:
                history = torch.from_numpy(self._history(min(self._filled, self.window))).unsqueeze(0)
                every = forecast_windows(model, history, horizons=bool(self._far))[0]  # (H, C)
                pending[MODEL] = every[0]
                for i, made in enumerate(far):
                    made[MODEL] = every[i + 1]
            for b in self._baselines:  # each sees only the history it uses
                recent = self._history(min(self._filled, b.history_steps), channels_only=True)
                pending[b.name] = np.asarray(b.predict(recent)[:n], dtype=np.float32)
                for steps, made in zip(self._far, far, strict=True):
                    ahead = b.predict_ahead(recent, steps)
                    if ahead is not None:
                        made[b.name] = np.asarray(ahead[:n], dtype=np.float32)
            self._pending = pending
            self._pending_version = version
            self._pending_served = list(self._served)
            forecast = np.array([pending[name][c] for c, name in enumerate(self._served)], dtype=np.float32)
            horizons = []
            for steps, made in zip(self._far, far, strict=True):
                self._far_pending[steps][k + steps] = made
                by = tuple(name if name in made else anchor for name in self._far_served[steps])
                values = np.array([made[name][c] for c, name in enumerate(by)], dtype=np.float32)
                horizons.append(HorizonForecast(steps, t + steps * period, self.base.norm.invert(values), by))
            return ScoreResult(
                t=t,
                actual=self.base.in_model_order(raw)[:n],
                forecast_t=t + period,
                forecast=self.base.norm.invert(forecast),
                residual=residual,
                score=score,
                anomaly=anomaly,
                model_version=scored_version if residual is not None else None,
                forecast_version=version,
                served_by=_label(scored) if scored is not None else None,
                forecast_by=_label(self._served),
                forecast_by_channel=tuple(self._served),
                residuals=residuals,
                horizons=tuple(horizons),
                horizon_residuals=horizon_residuals or None,
            )


def forecast_windows(model: Forecaster, windows: torch.Tensor, horizons: bool = False) -> np.ndarray:
    """(B, H, C) normalised forecasts made at the last row of each (B, T, n_inputs) window: of each
    of `cfg.horizons` steps ahead, or (H = 1) of the next step alone. The serving forward, live
    and in the offline replay."""
    with torch.inference_mode():
        if horizons:
            return model.forward_horizons(windows)[:, -1].numpy().copy()
        return model(windows)[:, -1:].numpy().copy()


def baselines_of(items: list[BaselineJson] | None) -> list[Baseline]:
    """The baselines recorded with a base or an adapter (their `baselines`); persistence alone when none were."""
    return baselines_from_dict(items) if items else [Persistence()]


def _label(names: list[str]) -> str:
    """The one forecaster behind every channel, or "mixed"."""
    return names[0] if len(set(names)) == 1 else "mixed"
