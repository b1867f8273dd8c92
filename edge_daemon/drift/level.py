"""A channel's level judged against the same time of day on earlier days: an abrupt, lasting
shift of what the sensor reads (a motor's current up 45% under overload) found in minutes,
whether or not the model's residuals show it.

A forecaster follows a new level within a few steps, so its residuals rise only briefly at an
abrupt step and the residual judges may take long to see it. The level itself shows it at once,
but a process's level follows the clock (a line that runs from 06:00, a batch every quarter
hour), so it is judged against what is typical at that time of day.

Half-minute medians of the channel (robust to spikes, which are anomalies alerted on their
own) are compared with the mean and spread of the medians of the same quarter hour on earlier
days (fewer, longer slices where a quarter hour holds fewer than four medians), the spread
floored at the channel's typical one and at a share of its daily range (a channel off half the
day, constant there, would otherwise have no spread to judge by). A two-sided CUSUM on the
standardised medians (slack `k`, threshold `h`, in standard deviations) signals a shift; the
episode lasts until the level has been back to normal for `calm_s` (medians within `k`), and
meanwhile the slices learn nothing: a shift must not teach itself as normal, and a slice that
learnt part of one would see a shift at that time every day. A shift that lasts a whole day is
the new normal: every slice takes what it read during that day (`rebase`).

A slice learns its day once it is over, with weight max(`min_rate`, 1 / (days learnt + 1)). It
starts from a prior (`LevelPrior`: the same statistics of the store's newest day, counted as one
day) and is not judged until it has one: a slice nothing has covered waits for a day of the
stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

LevelState = Literal["learning", "watching", "shift"]

BLOCK_S = 30.0  # seconds a median covers
MAX_BINS = 96  # quarter hours of a day
MIN_BLOCKS_IN_BIN = 4  # medians a slice covers each day, at least: fewer slices at slow periods


def slice_count(block_s: float, day_s: float = 86400.0) -> int:
    """Slices of the day: quarter hours, fewer where a quarter hour holds too few medians."""
    return int(max(1, min(MAX_BINS, (day_s / block_s) // MIN_BLOCKS_IN_BIN)))


@dataclass(frozen=True)
class LevelPrior:
    """Per slice of the day, the mean and std of the half-minute medians some data holds (None
    where it holds too few): where a level judge starts."""

    mean: tuple[float | None, ...]
    std: tuple[float | None, ...]

    @classmethod
    def of(
        cls, ts: np.ndarray, values: np.ndarray, block_s: float = BLOCK_S, day_s: float = 86400.0, min_values: int = 1
    ) -> LevelPrior:
        """From raw values at times `ts` (one channel; NaN skipped); a block with fewer than
        `min_values` values (a gap's edge) is no median."""
        bins = slice_count(block_s, day_s)
        ts = np.asarray(ts, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        keep = np.isfinite(ts) & np.isfinite(values)
        ts, values = ts[keep], values[keep]
        mean: list[float | None] = [None] * bins
        std: list[float | None] = [None] * bins
        if not len(ts):
            return cls(tuple(mean), tuple(std))
        block = np.floor(ts / block_s).astype(np.int64)
        order = np.argsort(block, kind="stable")
        block, values = block[order], values[order]
        starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
        parts = np.split(values, starts[1:])
        whole = np.array([len(part) >= min_values for part in parts])
        medians = np.array([np.median(part) for part, keep in zip(parts, whole, strict=True) if keep])
        slices = (((block[starts][whole] * block_s) % day_s) // (day_s / bins)).astype(np.int64) % bins
        for b in range(bins):
            found = medians[slices == b]
            if len(found) >= 2:
                mean[b], std[b] = float(found.mean()), float(found.std())
        return cls(tuple(mean), tuple(std))


class LevelJudge:
    """Two-sided CUSUM of one channel's half-minute medians against the same time of day."""

    def __init__(
        self,
        period_s: float,
        *,
        block_s: float = BLOCK_S,
        k: float = 2.0,
        h: float = 20.0,
        clip: float = 10.0,
        calm_s: float = 900.0,
        min_rate: float = 0.1,
        range_floor: float = 0.02,
        day_s: float = 86400.0,
    ) -> None:
        if period_s <= 0 or block_s <= 0 or h <= 0 or k < 0 or clip <= k:
            raise ValueError("period_s, block_s and h must be > 0, k >= 0 and clip > k")
        self.block_s = max(float(block_s), float(period_s))
        self.k, self.h, self.clip = float(k), float(h), float(clip)
        self.min_rate = float(min_rate)
        self.range_floor = float(range_floor)
        self.day_s = float(day_s)
        self.bins = slice_count(self.block_s, self.day_s)
        self._bin_s = self.day_s / self.bins
        # A median needs half the block's values: a gap's leftovers are not a level.
        self.min_values = max(1, int(self.block_s / period_s) // 2)
        self._episode_max_blocks = int(self.day_s / self.block_s)
        # Medians back within k in a row that end an episode: `calm_s` of them, at least three,
        # and well under a day's (else an episode could only end by becoming the new normal).
        self.calm_blocks = max(3, min(math.ceil(calm_s / self.block_s), self._episode_max_blocks // 4))
        self._mean = [0.0] * self.bins
        self._var = [0.0] * self.bins
        self._days = [0.0] * self.bins  # days learnt per slice (a prior counts as one)
        self._floor = 0.0
        self._block: int | None = None
        self._values: list[float] = []
        self._slice: int | None = None  # the slice (since the epoch) whose medians are being gathered
        self._slice_medians: list[float] = []
        self._up = self._down = 0.0
        self._run_up = self._run_down = 0
        self.episode = False
        self._episode_blocks = 0
        self._calm_blocks = 0
        self._episode_slices: dict[int, list[float]] = {}  # slice -> its medians in the episode (the last day's)
        self.onset: float | None = None  # when the shift began, at its detection (Page's estimate)

    # -- set-up ----------------------------------------------------------------------------

    def seed(self, prior: LevelPrior) -> None:
        """Slices that have learnt nothing start from `prior` (counted as one day)."""
        if len(prior.mean) != self.bins:
            raise ValueError(f"a prior of {len(prior.mean)} slices for a judge of {self.bins}")
        for b, (mean, std) in enumerate(zip(prior.mean, prior.std, strict=True)):
            if self._days[b] == 0 and mean is not None and std is not None:
                self._mean[b], self._var[b], self._days[b] = mean, std * std, 1.0
        self._refloor()

    def prior_of(self, ts: np.ndarray, values: np.ndarray) -> LevelPrior:
        """The prior of this judge's slices from raw values at times `ts` (its blocks, its day)."""
        return LevelPrior.of(ts, values, self.block_s, self.day_s, self.min_values)

    def rebase(self) -> None:
        """A shift that has lasted a whole day is the new normal: every slice it saw whole takes
        what it read there (counted as a day), and the episode ends. The slice under way learns
        what it reads when it is over, as one that has learnt nothing."""
        if self.episode:
            for b in range(self.bins):
                medians = self._episode_slices.get(b)
                if medians is not None and len(medians) >= 2:
                    self._mean[b], self._var[b], self._days[b] = float(np.mean(medians)), float(np.var(medians)), 1.0
                else:
                    self._days[b] = 0.0
            self._refloor()
        self._end_episode()

    # -- reading ---------------------------------------------------------------------------

    @property
    def statistic(self) -> float:
        """The larger CUSUM sum, in standard deviations."""
        return max(self._up, self._down)

    @property
    def learnt_fraction(self) -> float:
        """Share of the slices of the day that have a typical level."""
        return sum(1 for d in self._days if d > 0) / self.bins

    @property
    def state(self) -> LevelState:
        """"shift" in an episode; "watching" once every slice has a typical level; else "learning"."""
        if self.episode:
            return "shift"
        return "watching" if all(d > 0 for d in self._days) else "learning"

    # -- feeding ---------------------------------------------------------------------------

    def update(self, t: float, x: float) -> bool:
        """Add the value at time t; True when it completes a median that starts a shift episode."""
        block = int(t // self.block_s)
        fired = False
        if self._block is not None and block != self._block:
            fired = self._close_block()
        self._block = block
        if math.isfinite(x):
            self._values.append(float(x))
        return fired

    def _close_block(self) -> bool:
        assert self._block is not None
        values, start = self._values, self._block * self.block_s
        self._values = []
        if len(values) < self.min_values:
            return False
        median = float(np.median(values))
        whole_slice = int(start // self._bin_s)
        if self._slice is not None and whole_slice != self._slice:
            self._learn_slice()
        self._slice = whole_slice
        self._slice_medians.append(median)
        b = whole_slice % self.bins
        if self._days[b] == 0:
            return False  # nothing typical known for this time of day yet
        typical = self._mean[b]
        z = (median - typical) / max(math.sqrt(self._var[b]), self._floor, 1e-9 * (1.0 + abs(typical)))
        z = max(-self.clip, min(self.clip, z))
        self._up = max(0.0, self._up + z - self.k)
        self._down = max(0.0, self._down - z - self.k)
        self._run_up = self._run_up + 1 if self._up > 0 else 0
        self._run_down = self._run_down + 1 if self._down > 0 else 0
        if self.episode:
            self._episode_blocks += 1
            self._calm_blocks = self._calm_blocks + 1 if abs(z) <= self.k else 0
            if self._calm_blocks >= self.calm_blocks:
                self._end_episode()  # back to normal
            elif self._episode_blocks >= self._episode_max_blocks:
                self.rebase()  # a day of it: the new normal
            return False
        if self._up <= self.h and self._down <= self.h:
            return False
        run = self._run_up if self._up > self._down else self._run_down
        self.onset = start - (run - 1) * self.block_s
        self.episode = True
        self._episode_blocks = run
        self._calm_blocks = 0
        self._up = self._down = 0.0
        self._run_up = self._run_down = 0
        return True

    def _learn_slice(self) -> None:
        """The slice being gathered is over: it learns its day (not during an episode)."""
        medians, self._slice_medians = self._slice_medians, []
        assert self._slice is not None
        b = self._slice % self.bins
        if self.episode:
            # What a rebase starts from: the slice whole within the episode (its first medians
            # may precede the shift, so a slice the episode began in is not one of them).
            if self._episode_blocks >= len(medians):
                self._episode_slices[b] = medians
            return
        if len(medians) < 2:
            return
        day_mean, day_var = float(np.mean(medians)), float(np.var(medians))
        if self._days[b] == 0:
            self._mean[b], self._var[b] = day_mean, day_var
        else:
            rate = max(self.min_rate, 1.0 / (self._days[b] + 1.0))
            delta = day_mean - self._mean[b]
            self._mean[b] += rate * delta
            self._var[b] = (1.0 - rate) * (self._var[b] + rate * delta * delta) + rate * day_var
        self._days[b] += 1.0
        self._refloor()

    def _refloor(self) -> None:
        """The spread floor: the typical slice's spread (a quiet slice judged by its own tiny
        spread would read a small wobble as a shift), and `range_floor` of the range of the
        slices' means (a channel constant much of the day, such as a current that is 0 while
        the machine is off, has a typical spread of 0)."""
        known = [b for b in range(self.bins) if self._days[b] > 0]
        if not known:
            self._floor = 0.0
            return
        spreads = [math.sqrt(self._var[b]) for b in known]
        means = [self._mean[b] for b in known]
        self._floor = max(float(np.median(spreads)), self.range_floor * (max(means) - min(means)))

    def _end_episode(self) -> None:
        self.episode = False
        self._episode_blocks = 0
        self._episode_slices = {}
        self._calm_blocks = 0
        self._up = self._down = 0.0
        self._run_up = self._run_down = 0

