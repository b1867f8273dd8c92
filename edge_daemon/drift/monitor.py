"""DriftMonitor, the daemon's drift judge: feeds each grid step's inputs and residuals to the
per-channel state (drift/channel.py), returns new detections as `DriftEvent`s for alerts,
restarts the baseline after an accepted adapter and builds the `drift` object of the status reply.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_daemon.drift.channel import Channel, Kind, iso8601, residual_episode_over
from edge_daemon.drift.cusum import CUSUM
from edge_daemon.drift.level import LevelJudge, LevelPrior
from edge_daemon.drift.prior import HOURS, ResidualPrior
from edge_daemon.drift.profile import TimeOfDayProfile
from edge_daemon.drift.reference import Reference, ReferenceShift, ResidualRatio
from edge_daemon.mqtt.outputs import DriftAlert, drift_alert
from edge_daemon.control.replies import DriftStatus

if TYPE_CHECKING:
    from edge_daemon.config import DriftConfig

log = logging.getLogger(__name__)

# A baseline of exactly zero (a channel the model predicts perfectly) would
# make every later residual infinitely large; any real residual still drifts.
_MIN_BASELINE = 1e-9

# Residual ratios (|residual| / baseline) above this are fed to the detector as this.
RESIDUAL_CLIP = 4.0
# The residual CUSUM counts a standardised |residual| as at most this many standard
# deviations: a spike of a few steps (an anomaly, alerted on its own) then adds at most
# (clip - k) a step, well under the threshold, while a sustained shift keeps adding.
CUSUM_CLIP = 3.0


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One new detection, for the daemon to publish as an alert."""

    channel: str
    kind: Kind  # which stream drifted: the channel's inputs or the model's residuals on it
    t: float  # unix seconds of the step that signalled it
    detections: int  # the channel's detection count including this one
    residual_level: float | None
    residual_baseline: float | None

    def alert(self) -> DriftAlert:
        """The `drift` alert published for it."""
        return drift_alert(self.channel, self.kind, self.t, self.detections, self.residual_level, self.residual_baseline)


class DriftMonitor:
    """Drift detectors per channel over the inputs and the model's residuals.

    Feed it every grid step: `update_inputs(values, t)` with the channels'
    values and `update_residuals(residuals, t)` with the model's residuals in
    its normalised units (target minus forecast, divided by the channel's
    training std). Non-finite entries are skipped. Both return the new
    detections, for alerts. After an accepted adapter, `reset_baseline(t)`.

    By default (`cfg.inputs = "reference"`, `cfg.residuals = "window"`) both
    are judged over a rolling window of whole cycles (`input_window_s`,
    `residual_window_s`: a day), so the daily and batch cycles of normal
    operation are not drift (drift/reference.py):

    - inputs: PSI of the window against `input_reference` (the deciles of the
      base model's training data; without one, the first full window);
    - residuals: mean |residual| of the window against the mean of the first
      full window after start-up or the last accepted adapter. A model that
      gets better is never drift. Beside it (`cfg.cusum`), a CUSUM raises the
      same residual drift within minutes of an abrupt shift: it reads each
      |residual| over the typical one at that time of day on earlier days
      (`cfg.cusum_by_time_of_day`; it watches once it has seen a whole day),
      averaged over `cfg.cusum_block_s`, standardised by its own running mean
      and std. An episode is alerted once, whichever judge sees it first.

    Each signals once an episode (hysteresis). An accepted adapter restarts
    the residual baseline and makes the next input window the reference.

    With `residual_prior` (what the served model's held-out validation
    residuals say is normal, drift/prior.py: the base's at start-up and with
    `set_residual_prior`, an adapter's with `reset_baseline`) the residual
    judges do not wait for a day: the filling window is judged against the
    |residual| the prior expects at the hours it has seen, the CUSUM's
    time-of-day slices start from the prior (counted as one day) and its mean
    and std from the held-out half-minute means. `cfg.residual_prior = false`
    ignores it.

    The "stream" modes run `cfg.detector` on every value instead:

    - residuals: on |residual| divided by the baseline, the mean |residual|
      of the first `cfg.min_samples` residuals after the last reset; a
      detection counts only while the level (EWMA of |residual|) is above
      that baseline;
    - inputs: on the standardised value and its step-to-step change.
      `input_scale` (mean, std per channel) standardises them; without it the
      first `cfg.min_samples` values estimate them, and again after each
      input detection, when the detectors start afresh.

    Safe to call from several threads (one lock).
    """

    def __init__(
        self,
        channels: list[str],
        cfg: DriftConfig,
        *,
        input_scale: tuple[Sequence[float], Sequence[float]] | None = None,
        input_reference: Sequence[Reference | None] | None = None,
        period_s: float = 1.0,
        residual_prior: Sequence[ResidualPrior] | None = None,
    ) -> None:
        if not channels:
            raise ValueError("channels must not be empty")
        if len(set(channels)) != len(channels):
            raise ValueError("channel names must be unique")
        if input_scale is not None:
            means, stds = (list(map(float, part)) for part in input_scale)
            if len(means) != len(channels) or len(stds) != len(channels):
                raise ValueError(f"input_scale needs {len(channels)} means and stds, got {len(means)} and {len(stds)}")
            if not all(math.isfinite(m) and math.isfinite(s) and s > 0 for m, s in zip(means, stds, strict=True)):
                raise ValueError("input_scale means must be finite and stds finite and > 0")
        if input_reference is not None and len(input_reference) != len(channels):
            raise ValueError(f"input_reference needs {len(channels)} references, got {len(input_reference)}")
        self.cfg = cfg
        self.channels = list(channels)
        self.period_s = float(period_s)
        self._window = max(20, round(cfg.input_window_s / period_s))
        self._cusum_block = max(1, round(cfg.cusum_block_s / period_s))  # residuals per CUSUM value
        self._channels = [
            Channel(
                name,
                index,
                cfg,
                None if input_scale is None else means[index],
                None if input_scale is None else stds[index],
                self._shift(None if input_reference is None else input_reference[index]),
                self._residual_window(period_s),
                self._residual_cusum(),
                self._residual_profile(period_s),
                self._level(name, period_s),
            )
            for index, name in enumerate(channels)
        ]
        self._level_rate = 1.0 - 0.5 ** (1.0 / cfg.residual_halflife_steps)
        self._baseline_since: float | None = None
        self._lock = threading.Lock()
        self._seed(residual_prior)

    def _shift(self, reference: Reference | None) -> ReferenceShift | None:
        if self.cfg.inputs != "reference":
            return None
        return ReferenceShift(
            self._window, reference=reference, threshold=self.cfg.psi_threshold, rearm=self.cfg.psi_rearm
        )

    def _residual_window(self, period_s: float) -> ResidualRatio | None:
        if self.cfg.residuals != "window":
            return None
        return ResidualRatio(
            max(2, round(self.cfg.residual_window_s / period_s)),
            threshold=self.cfg.residual_ratio,
            rearm=self.cfg.residual_rearm_ratio,
        )

    def _residual_cusum(self) -> CUSUM | None:
        if self.cfg.residuals != "window" or not self.cfg.cusum:
            return None
        # Upward only: a model getting better is no reason to adapt. On |residual|, so a
        # forecast that turns biased (either sign) and one that turns noisier both raise it.
        warmup = max(2, self.cfg.cusum_warmup_steps // self._cusum_block)
        return CUSUM(k=self.cfg.cusum_k, h=self.cfg.cusum_h, warmup=warmup, clip=CUSUM_CLIP, mode="up")

    def _level(self, name: str, period_s: float) -> LevelJudge | None:
        if name not in self.cfg.level_channels:
            return None
        return LevelJudge(period_s, block_s=self.cfg.level_block_s, k=self.cfg.level_k, h=self.cfg.level_h)

    def seed_levels(self, priors: Sequence[LevelPrior | None]) -> None:
        """Start each level judge's slices that know nothing yet from a prior (the store's newest
        day, at start-up): they judge from the first hour instead of after a day."""
        if len(priors) != len(self._channels):
            raise ValueError(f"need {len(self._channels)} priors, got {len(priors)}")
        with self._lock:
            for channel, prior in zip(self._channels, priors, strict=True):
                if channel.level_judge is not None and prior is not None:
                    channel.level_judge.seed(prior)

    def seed_levels_from(self, readings: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> None:
        """`seed_levels` with each judge's prior made from raw readings (times, values) of its
        channel, by the judge's own blocks and day (None: nothing stored for that channel)."""
        with self._lock:
            judges = [c.level_judge for c in self._channels]
        self.seed_levels([None if judge is None or data is None else judge.prior_of(*data)
                          for judge, data in zip(judges, readings, strict=True)])  # fmt: skip

    @property
    def level_block_s(self) -> float:
        """Seconds each level median covers (what a prior must be made with)."""
        return max(self.cfg.level_block_s, self.period_s)

    def _residual_profile(self, period_s: float) -> TimeOfDayProfile | None:
        if self.cfg.residuals != "window" or not self.cfg.cusum or not self.cfg.cusum_by_time_of_day:
            return None
        return TimeOfDayProfile(period_s)

    def residual_typical(self, channel: str, t: float) -> float | None:
        """The typical |residual| the CUSUM judges `channel`'s at time t against (its time-of-day
        profile's slice); None without a profile or before the slice has one."""
        with self._lock:
            found = next((c for c in self._channels if c.name == channel), None)
            profile = None if found is None else found.residual_profile
            return None if profile is None else profile.typical(t)

    def residual_cusum_statistics(self) -> list[float | None]:
        """Per channel, the residual CUSUM's sum now (its threshold is `cfg.cusum_h`); None without one."""
        return [None if c.residual_cusum is None else c.residual_cusum.statistic for c in self._channels]

    def _seed(self, priors: Sequence[ResidualPrior] | None) -> None:
        """Start the residual judges of every channel from what a model's held-out validation
        residuals say is normal (drift/prior.py); None: they learn from the stream alone."""
        if not self.cfg.residual_prior:
            priors = None
        if priors is not None and len(priors) != len(self._channels):
            log.warning("validation residuals for %d channels, not %d: judging from the stream", len(priors), len(self._channels))
            priors = None
        for index, channel in enumerate(self._channels):
            prior = None if priors is None else priors[index]
            window, profile, cusum = channel.residual_window, channel.residual_profile, channel.residual_cusum
            if prior is None or window is None:
                channel.residual_expected = None
                continue
            # Hours the held-out windows miss: what the judges hold for them, scaled by how this
            # model's held-out residuals compare with it at the hours they cover.
            previous = channel.residual_expected or [None] * HOURS
            held = [profile.hour_typical(h) if profile is not None else previous[h] for h in range(HOURS)]
            if prior.incumbent_ratio is not None:
                # An adapter's: every hour the judges know, times how its held-out residuals compare
                # with the incumbent's on the same windows; its own hourly values only where they know nothing.
                scale: float | None = prior.incumbent_ratio
                own = [p if q is None else None for p, q in zip(prior.hourly, held, strict=True)]
            else:
                pairs = [(p, q) for p, q in zip(prior.hourly, held, strict=True) if p is not None and q is not None]
                scale = sum(p for p, _ in pairs) / sum(q for _, q in pairs) if pairs else None
                own = list(prior.hourly)
            expected = [p if p is not None else None if q is None or scale is None else q * scale
                        for p, q in zip(own, held, strict=True)]  # fmt: skip
            channel.residual_expected = expected
            window.use_prior(max(2, round(3600.0 / self.period_s)))
            if profile is not None:
                profile.seed(own, scale)
            if cusum is not None and prior.block_cv is not None:
                # The spread of block means shrinks with the square root of the block's length.
                cv = prior.block_cv * math.sqrt(prior.block_s / (self._cusum_block * self.period_s))
                if profile is not None:
                    cusum.seed(1.0, cv)  # it reads |residual| over the typical one at that time of day
                else:
                    cusum.seed(prior.mean_abs, cv * prior.mean_abs)

    def set_residual_prior(self, priors: Sequence[ResidualPrior] | None) -> None:
        """A new base model: its residuals are judged afresh, from its held-out validation residuals
        when it recorded them."""
        with self._lock:
            for channel in self._channels:
                channel.reset_residuals()
                channel.reset_level()  # a shift seen before the base is in its training data
            self._seed(priors)

    def set_input_reference(self, references: Sequence[Reference | None]) -> None:
        """The training data of a (new) base model becomes the input reference of every channel."""
        if len(references) != len(self._channels):
            raise ValueError(f"need {len(self._channels)} references, got {len(references)}")
        with self._lock:
            for channel, reference in zip(self._channels, references, strict=True):
                channel.shift = self._shift(reference)
                channel.inputs.since_reset = 0

    # -- feeding -------------------------------------------------------------

    def update_inputs(self, values: np.ndarray | Sequence[float], t: float) -> list[DriftEvent]:
        """Feed one grid step of channel values (C,); return new input detections."""
        row = self._row(values, "values")
        events: list[DriftEvent] = []
        min_samples = self.cfg.min_samples
        with self._lock:
            for channel, x in zip(self._channels, row, strict=True):
                if not math.isfinite(x):
                    continue
                channel.input_samples += 1
                judge = channel.level_judge
                if judge is not None and judge.update(t, x):
                    # Dated by the CUSUM; an update after it learns from there.
                    if channel.level_change_from is None:
                        channel.level_change_from = judge.onset
                    channel.level.record(t)
                    events.append(self._event(channel, "level", t))
                    log.info("level shift on %s (CUSUM by time of day), began about %s", channel.name, iso8601(judge.onset))
                if channel.shift is not None:
                    if channel.shift.update(x):
                        channel.inputs.record(t)
                        events.append(self._event(channel, "inputs", t))
                    elif channel.inputs.since_reset and not channel.shift.drifted:
                        log.info("input drift on %s over: PSI %.3f", channel.name, channel.shift.last_psi or 0.0)
                        channel.inputs.since_reset = 0
                    continue
                if channel.scale is None:
                    # Warm-up: Welford's mean and variance, then freeze them.
                    n = channel.input_samples
                    delta = x - channel.warm_mean
                    channel.warm_mean += delta / n
                    channel.warm_m2 += delta * (x - channel.warm_mean)
                    if n >= min_samples:
                        std = math.sqrt(channel.warm_m2 / n)
                        channel.center = channel.warm_mean
                        # A constant warm-up gives no scale; use raw units.
                        channel.scale = std if std > 1e-9 * (1.0 + abs(channel.warm_mean)) else 1.0
                    continue
                z = (x - channel.center) / channel.scale  # type: ignore[operator]
                level, spread = channel.level_detector, channel.spread_detector
                assert level is not None and spread is not None
                fired = level.update(z).drift_detected
                if channel.previous_z is not None:
                    fired = spread.update(abs(z - channel.previous_z)).drift_detected or fired
                channel.previous_z = z
                if fired:
                    channel.inputs.record(t)
                    events.append(self._event(channel, "inputs", t))
                    channel.restart_inputs()
        return events

    def update_residuals(self, residuals: np.ndarray | Sequence[float], t: float) -> list[DriftEvent]:
        """Feed one grid step of normalised residuals (C,); return new residual detections."""
        row = self._row(residuals, "residuals")
        events: list[DriftEvent] = []
        min_samples = self.cfg.min_samples
        with self._lock:
            for channel, r in zip(self._channels, row, strict=True):
                if not math.isfinite(r):
                    continue
                magnitude = abs(r)
                channel.residual_samples += 1
                window = channel.residual_window
                if window is not None:
                    expected = None if channel.residual_expected is None else channel.residual_expected[int((t % 86400.0) // 3600.0)]
                    slow = window.update(magnitude, expected)
                    cusum, profile = channel.residual_cusum, channel.residual_profile
                    judged: float | None = magnitude
                    if profile is not None:  # against the same time of day on earlier days
                        judged = profile.relative(t, magnitude)
                        profile.learn(t, magnitude)
                    fast = False
                    if cusum is not None and judged is not None:
                        channel.cusum_sum += judged
                        channel.cusum_count += 1
                        if channel.cusum_count >= self._cusum_block:
                            fast = cusum.update(channel.cusum_sum / channel.cusum_count).drift_detected
                            channel.cusum_sum, channel.cusum_count = 0.0, 0
                    channel.residual_level, channel.residual_baseline = window.level, window.baseline
                    if slow or fast:
                        if not channel.residual_episode:
                            channel.residual_episode = True
                            channel.residual_episode_steps = 0
                            # The CUSUM dates the shift; the window only says it lies within it.
                            steps_back = cusum.onset_steps * self._cusum_block if fast and cusum is not None else window.window
                            began = t - steps_back * self.period_s
                            if channel.residual_change_from is None:
                                channel.residual_change_from = began
                            channel.residuals.record(t)
                            events.append(self._event(channel, "residuals", t))
                            if fast:
                                log.info("residual drift on %s: abrupt shift (CUSUM)", channel.name)
                    elif channel.residual_episode:
                        channel.residual_episode_steps += 1
                        channel.residual_episode = not residual_episode_over(channel)
                    continue
                n = channel.residual_samples
                # Plain mean until the EWMA has that much memory, so the
                # first value does not dominate the level.
                rate = max(self._level_rate, 1.0 / n)
                level = magnitude if channel.residual_level is None else channel.residual_level
                channel.residual_level = level + rate * (magnitude - level)
                if channel.residual_baseline is None:
                    channel.baseline_sum += magnitude
                    if n >= min_samples:
                        channel.residual_baseline = max(channel.baseline_sum / n, _MIN_BASELINE)
                    continue
                # Clipped: a spike is an anomaly (alerted on its own), not a change of regime;
                # unclipped, one large spike shifts ADWIN's window mean and reads as drift.
                ratio = min(magnitude / channel.residual_baseline, RESIDUAL_CLIP)
                assert channel.residual_detector is not None
                if not channel.residual_detector.update(ratio).drift_detected:
                    continue
                if channel.residual_level <= channel.residual_baseline:
                    log.debug("residuals of %s changed but are not above the baseline; not drift", channel.name)
                    continue
                channel.residuals.record(t)
                events.append(self._event(channel, "residuals", t))
        return events

    def reset_baseline(self, t: float | None = None, priors: Sequence[ResidualPrior] | None = None) -> None:
        """An adapter was accepted: restart residual detectors, level and baseline, and the input
        references (re-learnt from the next window); all states stable. With `priors` (the
        adapter's held-out validation residuals) the residual judges start from them."""
        with self._lock:
            for channel in self._channels:
                channel.reset_residuals()
                channel.reset_level()
                if channel.shift is not None:
                    # The adapter learnt the recent data: inputs are judged against it from now on
                    # (the next full window becomes the reference).
                    channel.shift = self._shift(None)
            self._seed(priors)
            self._baseline_since = t
        log.info("drift baseline reset%s", f" at {iso8601(t)}" if t is not None else "")

    # -- reading -------------------------------------------------------------

    @property
    def drift_detected(self) -> bool:
        """Whether any channel drifted (inputs, residuals or level) since the last reset."""
        with self._lock:
            return any(c.drifted for c in self._channels)

    @property
    def residual_drift_detected(self) -> bool:
        """Whether the residuals of any channel drifted since the last reset."""
        with self._lock:
            return any(c.residuals.since_reset for c in self._channels)

    @property
    def update_drift_detected(self) -> bool:
        """Whether what warrants adapting the model drifted since the last reset: the residuals of
        any channel, or the level of one in `level_channels` (input drift by PSI also follows
        seasonal swings, and does not)."""
        with self._lock:
            return any(c.residuals.since_reset or c.level.since_reset for c in self._channels)

    @property
    def change_from(self) -> float | None:
        """Unix seconds at which what warrants adapting began to drift, as dated at the first
        detection since the last reset (residuals or level; the earliest over channels)."""
        with self._lock:
            starts = [t for c in self._channels for t in (c.residual_change_from, c.level_change_from) if t is not None]
            return min(starts) if starts else None

    @property
    def channels_drifted(self) -> dict[str, bool]:
        """Per channel: whether its inputs, residuals or level drifted since the last reset (its
        `state` in `status()`, without building the rest)."""
        with self._lock:
            return {c.name: c.drifted for c in self._channels}

    @property
    def residual_change_from(self) -> float | None:
        """Unix seconds at which the residuals began to drift, as estimated at the first detection
        since the last reset (the earliest over channels); None without one, or in stream mode."""
        with self._lock:
            starts = [c.residual_change_from for c in self._channels if c.residual_change_from is not None]
            return min(starts) if starts else None

    @property
    def last_detected(self) -> float | None:
        """Unix seconds of the latest detection on any channel (kept across resets)."""
        with self._lock:
            return self._last_t()

    def status(self) -> DriftStatus:
        """The `drift` object of the status reply (JSON-ready)."""
        with self._lock:
            channels = {c.name: c.status() for c in self._channels}
            return {
                "detected": any(ch["state"] == "drift" for ch in channels.values()),
                "channels": channels,
                "last_detected": iso8601(self._last_t()),
                "detector": self.cfg.detector,
                "inputs": self.cfg.inputs,
                "residuals": self.cfg.residuals,
                "baseline_since": iso8601(self._baseline_since),
            }

    # -- helpers -------------------------------------------------------------

    def _last_t(self) -> float | None:
        times = [t for t in (c.last_t for c in self._channels) if t is not None]
        return max(times) if times else None

    def _row(self, values: np.ndarray | Sequence[float], what: str) -> list[float]:
        row = np.asarray(values, dtype=np.float64)
        if row.shape != (len(self._channels),):
            raise ValueError(f"{what} must have shape ({len(self._channels)},), got {row.shape}")
        return list(row.tolist())  # Python floats: per-value math is faster than on numpy scalars

    def _event(self, channel: Channel, kind: Kind, t: float) -> DriftEvent:
        log.info("drift detected on %s (%s) at %s", channel.name, kind, iso8601(t))
        return DriftEvent(
            channel=channel.name,
            kind=kind,
            t=t,
            detections=channel.detections,
            residual_level=None if kind == "level" else channel.residual_level,
            residual_baseline=None if kind == "level" else channel.residual_baseline,
        )
