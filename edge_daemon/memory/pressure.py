"""The memory pressure level, the rule that moves it, and the level shared with a training worker.

Nothing here reads /proc (`memory.watchdog` does), so the plan ladder
(`training.plan`) depends on the level without importing psutil and the readers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Level(IntEnum):
    """Memory pressure, ordered so that comparisons mean 'worse than'."""

    NORMAL = 0
    ELEVATED = 1
    HIGH = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        """The name used in logs and the status reply."""
        return self.name.lower()


@dataclass(frozen=True)
class PressurePolicy:
    """Thresholds (shares of the budget) and the rule that moves between levels.

    Going up is immediate. Going down from a level needs the share below that
    level's threshold minus `hysteresis`, so usage hovering at a threshold
    does not flap. System MemAvailable below `min_available_mb` (memory taken
    by other processes on the device) is critical, below twice that is high;
    those are left only once MemAvailable is `available_margin` above them.
    """

    elevated: float = 0.70
    high: float = 0.80
    critical: float = 0.95
    hysteresis: float = 0.05
    min_available_mb: float = 64.0
    available_margin: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.elevated < self.high < self.critical:
            raise ValueError(f"thresholds must satisfy 0 < elevated < high < critical, got {self}")
        if not 0 <= self.hysteresis < self.elevated:
            raise ValueError(f"hysteresis must be in [0, elevated), got {self.hysteresis}")
        if self.min_available_mb < 0 or self.available_margin < 0:
            raise ValueError("min_available_mb and available_margin must be >= 0")

    @classmethod
    def from_config(cls, memory: Any) -> PressurePolicy:
        """Built from the `[memory]` config section."""
        return cls(memory.elevated, memory.high, memory.critical, memory.hysteresis, memory.min_available_mb)

    def threshold(self, level: Level) -> float:
        """Share of the budget at which `level` is entered (0 for normal)."""
        return {Level.NORMAL: 0.0, Level.ELEVATED: self.elevated, Level.HIGH: self.high, Level.CRITICAL: self.critical}[
            level
        ]

    def _available_threshold(self, level: Level) -> float:
        return {Level.CRITICAL: self.min_available_mb, Level.HIGH: 2 * self.min_available_mb}.get(level, 0.0)

    def _level_for(self, fraction: float, available_mb: float) -> Level:
        by_share = Level.NORMAL
        for level in (Level.ELEVATED, Level.HIGH, Level.CRITICAL):
            if fraction >= self.threshold(level):
                by_share = level
        by_available = Level.NORMAL
        if available_mb < self._available_threshold(Level.CRITICAL):
            by_available = Level.CRITICAL
        elif available_mb < self._available_threshold(Level.HIGH):
            by_available = Level.HIGH
        return max(by_share, by_available)

    def _may_leave(self, level: Level, fraction: float, available_mb: float) -> bool:
        share_ok = fraction < self.threshold(level) - self.hysteresis
        available_ok = available_mb >= self._available_threshold(level) * (1 + self.available_margin)
        return share_ok and available_ok

    def next_level(self, current: Level, fraction: float, available_mb: float) -> Level:
        """The level after a sample of `fraction` (usage / budget) and system MemAvailable."""
        target = self._level_for(fraction, available_mb)
        if target >= current:
            return target
        level = current
        while level > target and self._may_leave(level, fraction, available_mb):
            level = Level(level - 1)
        return level


# ------------------------------------------------------------------ shared level


class SharedLevel:
    """The pressure level in shared memory, readable by a training child.

    Pass it to a `multiprocessing` child as a Process argument (it travels
    with the child whatever the start method); reading is one memory load,
    cheap enough for every micro-batch boundary. A single int needs no lock.
    """

    def __init__(self, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context()
        self._value = ctx.RawValue(ctypes.c_int, int(Level.NORMAL))

    def get(self) -> Level:
        return Level(self._value.value)

    def set(self, level: Level) -> None:
        self._value.value = int(level)

    def __call__(self) -> Level:
        return self.get()
