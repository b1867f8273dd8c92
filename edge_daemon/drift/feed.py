"""What drift is judged on, the same in the daemon and in the report.

Every grid step's forecast channels feed input drift (an input-only channel is
not a sensor to watch); every scored step's model residual feeds residual
drift (what warrants adapting the model is its own error, whoever is served).
The input reference is the base model's training data (drift/reference.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_daemon.drift.monitor import DriftEvent, DriftMonitor
from edge_daemon.drift.prior import ResidualPrior
from edge_daemon.drift.reference import forecast_references

if TYPE_CHECKING:
    from edge_daemon.artifacts.base import BaseModel
    from edge_daemon.config import Config


class DriftFeed:
    """A DriftMonitor for a config and a base model, and the rule of what it is fed."""

    def __init__(self, config: Config, base: BaseModel | None) -> None:
        self.monitor = DriftMonitor(
            config.channels.forecast,
            config.drift,
            input_reference=None if base is None else forecast_references(base),
            period_s=config.channels.period_s,
            residual_prior=None if base is None else base_residual_prior(base),
        )
        self._columns = [config.channels.names.index(name) for name in config.channels.forecast]

    def step(self, values: np.ndarray, t: float) -> list[DriftEvent]:
        """A grid step's raw values (every channel, config order): input drift."""
        return self.monitor.update_inputs(values[self._columns], t)

    def scored(self, model_residual: np.ndarray, t: float) -> list[DriftEvent]:
        """The model's normalised residual at a scored step (forecast channels): residual drift."""
        return self.monitor.update_residuals(model_residual, t)

    def new_base(self, base: BaseModel) -> None:
        """A new base model: its training data is the input reference from now on."""
        self.monitor.set_input_reference(forecast_references(base))
        self.monitor.set_residual_prior(base_residual_prior(base))


def base_residual_prior(base: BaseModel) -> list[ResidualPrior] | None:
    """What a base's held-out validation residuals say is normal, per forecast channel (None: a
    base from before they were recorded)."""
    return ResidualPrior.from_json(base.meta.get("validation_residuals"), base.cfg.n_channels)
