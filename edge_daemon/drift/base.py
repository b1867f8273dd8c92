"""Common shape of the streaming drift detectors: `update(x)` returns the
detector, `drift_detected` tells whether that update signalled drift, and
the update after a detection starts the detector afresh (river's semantics).
"""

from __future__ import annotations

import abc
from typing import Self


class DriftDetector(abc.ABC):
    """A univariate streaming drift detector."""

    def __init__(self) -> None:
        self._drift_detected = False

    @property
    def drift_detected(self) -> bool:
        """Whether the last `update` signalled drift."""
        return self._drift_detected

    def update(self, x: float) -> Self:
        """Feed one value; read `drift_detected` afterwards."""
        # A detection ends the old concept: start over on the new one, as
        # river does, so one change is reported once and not every step.
        if self._drift_detected:
            self.reset()
        self._drift_detected = self._update(float(x))
        return self

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._drift_detected = False
        self._reset_state()

    @abc.abstractmethod
    def _update(self, x: float) -> bool:
        """Add `x`; return whether drift is detected."""

    @abc.abstractmethod
    def _reset_state(self) -> None:
        """Clear the algorithm's own state."""


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """Raise ValueError naming the parameter and its valid interval."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:  # value != value catches NaN
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_choice(name: str, value: object, valid: tuple[object, ...]) -> None:
    """Raise ValueError naming the parameter and listing its valid values."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
