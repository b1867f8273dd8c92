"""Input drift against a reference distribution: the population stability index
of a long rolling window of a channel's values against the data the model
was trained on.

A per-step change detector (ADWIN, Page-Hinkley, KSWIN) on raw inputs fires
at every change of operating state: a motor's batch cycle and the day/night
swing of its temperature are changes of mean within any window shorter than
the cycle. Compared with the reference over a window that holds whole cycles
(a day by default), normal operation matches and a real shift of the
distribution (a recalibrated sensor, bearing wear raising vibration) does not.

The reference is the deciles of the training data: their edges cut the value
axis into bins, and the reference proportions are the training data's share
of each bin. PSI = sum((q - p) * ln(q / p)) over the bins, with q the
window's shares. Drift is signalled when PSI rises over `threshold` and
re-armed only once it falls under `rearm` (hysteresis: one alert an episode).

The usual marks for PSI (0.1 moderate, 0.25 significant) are for independent
samples; a day of a sensor is strongly autocorrelated, and the weather alone
moves a motor's temperature over days. On the sample motor with a two-day
reference, stationary days reached PSI 0.4-1.3 on temperature and < 0.1
elsewhere, while a bearing-wear or recalibration regime took the channel it
changes to 1.8-5.2; hence the defaults 1.0 and 0.5.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_daemon.frames import ValueReference, value_reference

if TYPE_CHECKING:
    from edge_daemon.artifacts.base import BaseMeta

log = logging.getLogger(__name__)

DEFAULT_BINS = 10


@dataclass(frozen=True)
class Reference:
    """A channel's reference distribution: interior bin edges and the share of each bin."""

    edges: tuple[float, ...]  # ascending, len = bins - 1 (duplicates of tied quantiles removed)
    proportions: tuple[float, ...]  # len = len(edges) + 1, sums to 1
    samples: int

    @classmethod
    def from_values(cls, values: np.ndarray | Sequence[float], bins: int = DEFAULT_BINS) -> Reference:
        """Decile edges (for `bins`=10) of the finite values and each bin's share of them."""
        return cls.from_dict(value_reference(np.asarray(values), bins))

    def as_dict(self) -> ValueReference:
        return {"edges": list(self.edges), "proportions": list(self.proportions), "samples": self.samples}

    @classmethod
    def from_dict(cls, data: ValueReference) -> Reference:
        edges = tuple(float(e) for e in data["edges"])
        proportions = tuple(float(p) for p in data["proportions"])
        if len(proportions) != len(edges) + 1 or list(edges) != sorted(edges):
            raise ValueError("a reference needs ascending edges and one proportion more than edges")
        if not all(math.isfinite(e) for e in edges) or abs(sum(proportions) - 1.0) > 1e-6 or min(proportions) < 0:
            raise ValueError("reference edges must be finite and proportions a distribution")
        return cls(edges, proportions, int(data.get("samples", 0)))


def references_from_meta(meta: BaseMeta, channels: Sequence[str]) -> list[Reference | None]:
    """Per channel, the input reference a base model recorded at pretraining (None: not recorded)."""
    recorded = meta.get("input_reference")
    if not isinstance(recorded, list) or len(recorded) != len(channels):
        return [None] * len(channels)
    references: list[Reference | None] = []
    for name, item in zip(channels, recorded, strict=True):
        try:
            references.append(None if item is None else Reference.from_dict(item))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("input reference of %s in the base model is unusable (%s); learning one from the stream", name, exc)
            references.append(None)
    return references


def forecast_references(base: Any) -> list[Reference | None]:
    """The input references a base model (`artifacts.base.BaseModel`) recorded for its forecast channels,
    which lead its channels: the ones drift is judged on."""
    return references_from_meta(base.meta, base.channels)[: base.cfg.n_channels]


def psi(window_counts: Sequence[int], reference: Reference) -> float:
    """Population stability index of binned window counts against the reference shares.

    Shares are smoothed by half a count per bin, so an empty bin on either
    side gives a large but finite term.
    """
    k = len(reference.proportions)
    n = float(sum(window_counts))
    n_ref = float(max(reference.samples, 1))
    total = 0.0
    for count, p in zip(window_counts, reference.proportions, strict=True):
        q = (count + 0.5) / (n + 0.5 * k)
        p = (p * n_ref + 0.5) / (n_ref + 0.5 * k)
        total += (q - p) * math.log(q / p)
    return total


def _due(judge: ReferenceShift | ResidualRatio) -> bool:
    """Count one value; True on every `every`-th, when the window is judged."""
    judge._since_check += 1
    if judge._since_check < judge.every:
        return False
    judge._since_check = 0
    return True


def _episode_starts(judge: ReferenceShift | ResidualRatio, value: float) -> bool:
    """Hysteresis: True when `value` rises over the threshold; re-armed once under `rearm`."""
    if judge.drifted:
        if value < judge.rearm:
            judge.drifted = False
        return False
    if value > judge.threshold:
        judge.drifted = True
        return True
    return False


class ReferenceShift:
    """PSI of the last `window` values of one channel against a `Reference`.

    Update with each value; every `every` values, once the window is full, the
    PSI is computed and `update` returns True when it crosses `threshold`
    upward (not again until it has fallen below `rearm`). Without a reference
    the first `window` values become it. O(1) per value: a ring of bin indices
    and the count per bin.
    """

    def __init__(
        self,
        window: int,
        *,
        reference: Reference | None = None,
        threshold: float = 1.0,
        rearm: float = 0.5,
        every: int | None = None,
        bins: int = DEFAULT_BINS,
    ) -> None:
        if window < 2 * bins:
            raise ValueError(f"window must be at least {2 * bins} values, got {window}")
        if not 0 < rearm < threshold:
            raise ValueError(f"need 0 < rearm < threshold, got rearm={rearm}, threshold={threshold}")
        self.window = int(window)
        self.threshold = float(threshold)
        self.rearm = float(rearm)
        self.every = max(1, int(every if every is not None else window // 96))
        self.bins = int(bins)
        self._learning: list[float] | None = None
        self.reference: Reference | None = None
        self.last_psi: float | None = None
        self.drifted = False  # True from a signal until PSI falls under `rearm`
        self._set_reference(reference)

    def _set_reference(self, reference: Reference | None, learned: bool = False) -> None:
        self.reference = reference
        self.learned = learned  # the reference is the stream's first window, not training data
        self._learning = [] if reference is None else None
        k = 1 if reference is None else len(reference.proportions)
        self._edges: list[float] = [] if reference is None else list(reference.edges)
        self._ring = np.zeros(self.window, dtype=np.uint8)
        self._counts = [0] * k
        self._pos = 0
        self._filled = 0
        self._since_check = 0
        self.last_psi = None
        self.drifted = False

    @property
    def filled(self) -> int:
        """Values in the window (or, while learning, in the reference being collected)."""
        return len(self._learning) if self._learning is not None else self._filled

    def update(self, x: float) -> bool:
        """Add one finite value; True when this value's check signals drift."""
        if self._learning is not None:
            self._learning.append(x)
            if len(self._learning) >= self.window:
                self._set_reference(Reference.from_values(self._learning, self.bins), learned=True)
            return False
        b = bisect.bisect_right(self._edges, x)
        if self._filled == self.window:
            self._counts[self._ring[self._pos]] -= 1
        else:
            self._filled += 1
        self._ring[self._pos] = b
        self._counts[b] += 1
        self._pos = (self._pos + 1) % self.window
        if self._filled < self.window:
            return False
        if not _due(self):
            return False
        assert self.reference is not None
        self.last_psi = psi(self._counts, self.reference)
        return _episode_starts(self, self.last_psi)


class ResidualRatio:
    """Mean |residual| of a rolling window against a baseline: the window's own first fill.

    After start-up or an accepted adapter the first `window` values set the
    baseline (their mean); from then on, every `every` values, the ratio of
    the last `window` values' mean to it is checked. `update` returns True when
    the ratio rises over `threshold`, and not again until it has fallen under
    `rearm`. A window of whole cycles keeps a model that is simply less exact
    at night (or in a batch's run-up) from reading as drift.

    With a prior (`use_prior`, after each reset), the window is judged while it
    fills too: the mean of the values that came with an `expected` |residual|
    (what the model's held-out residuals say is typical at that hour) over the
    mean of those expectations, once `min_values` of them have arrived. Once
    the window is full its own mean is the baseline, as without a prior.
    """

    def __init__(self, window: int, *, threshold: float = 2.0, rearm: float = 1.5, every: int | None = None) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2 values, got {window}")
        if not 1.0 <= rearm < threshold:
            raise ValueError(f"need 1 <= rearm < threshold, got rearm={rearm}, threshold={threshold}")
        self.window = int(window)
        self.threshold = float(threshold)
        self.rearm = float(rearm)
        self.every = max(1, int(every if every is not None else window // 96))
        self.reset()

    def reset(self) -> None:
        # float32: a day at 1 s is 86,400 values, 346 KB a channel.
        self._ring = np.zeros(self.window, dtype=np.float32)
        self._pos = 0
        self._filled = 0
        self._since_check = 0
        self.baseline: float | None = None
        self.level: float | None = None  # mean |residual| of the window at the last check
        self.ratio: float | None = None
        self.drifted = False
        self._prior_min: int | None = None  # with a prior: expected values needed before judging
        self._observed = self._expected = 0.0
        self._judged = 0

    def use_prior(self, min_values: int) -> None:
        """Judge the filling window against the `expected` values passed to `update`."""
        self._prior_min = max(1, int(min_values))

    @property
    def prior(self) -> bool:
        """Whether the baseline is still the prior's (the window is filling with a prior)."""
        return self._prior_min is not None and self._filled < self.window

    @property
    def filled(self) -> int:
        return self._filled

    def update(self, magnitude: float, expected: float | None = None) -> bool:
        """Add one |residual| (and, with a prior, the typical one expected at its time); True when
        this value's check signals drift."""
        self._ring[self._pos] = magnitude
        self._pos = (self._pos + 1) % self.window
        if self._filled < self.window:
            self._filled += 1
            if self._filled == self.window:
                self.baseline = max(float(self._ring.mean(dtype=np.float64)), 1e-9)
                self.level, self.ratio = self.baseline, 1.0
                return False
            if self._prior_min is None or expected is None:
                return False
            self._observed += magnitude
            self._expected += expected
            self._judged += 1
            if self._judged < self._prior_min or not _due(self):
                return False
            self.level = self._observed / self._judged
            self.baseline = max(self._expected / self._judged, 1e-9)
            self.ratio = self.level / self.baseline
            return _episode_starts(self, self.ratio)
        if not _due(self):
            return False
        assert self.baseline is not None
        self.level = float(self._ring.mean(dtype=np.float64))
        self.ratio = self.level / self.baseline
        return _episode_starts(self, self.ratio)
