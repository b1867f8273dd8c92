"""The drift state of one channel: the detectors and judges on its inputs and on the model's
residuals, its detection counts and levels, and its entry in the `drift` status object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from edge_daemon.times import iso
from edge_daemon.drift.adwin import ADWIN
from edge_daemon.drift.base import DriftDetector
from edge_daemon.drift.cusum import CUSUM
from edge_daemon.drift.level import LevelJudge
from edge_daemon.drift.profile import TimeOfDayProfile
from edge_daemon.drift.kswin import KSWIN
from edge_daemon.drift.page_hinkley import PageHinkley
from edge_daemon.drift.reference import ReferenceShift, ResidualRatio
from edge_daemon.control.replies import (
    ChannelDriftStatus,
    CusumStatus,
    DriftTrackStatus,
    LevelStatus,
    PsiStatus,
    ResidualWindowStatus,
)

if TYPE_CHECKING:
    from edge_daemon.config import DriftConfig

Kind = Literal["inputs", "residuals", "level"]


def iso8601(t: float | None) -> str | None:
    """A drift time: the grid step a detector fired on, to the millisecond."""
    return iso(t, "milliseconds")


def make_detector(cfg: DriftConfig, *, kind: Kind, seed: int = 0) -> DriftDetector:
    """The detector `cfg.detector` names, set up for one input or residual stream.

    Residual detectors only watch for increases where the algorithm has a
    direction (Page-Hinkley): a model getting better is no reason to adapt.
    """
    if cfg.detector == "adwin":
        return ADWIN(delta=cfg.delta, clock=cfg.clock, grace_period=cfg.min_samples)
    if cfg.detector == "page_hinkley":
        return PageHinkley(
            min_instances=cfg.min_samples,
            delta=cfg.ph_delta,
            threshold=cfg.ph_threshold,
            mode="up" if kind == "residuals" else "both",
        )
    if cfg.detector == "kswin":
        return KSWIN(
            alpha=cfg.kswin_alpha, window_size=cfg.kswin_window_size, stat_size=cfg.kswin_stat_size, seed=seed
        )
    raise ValueError(f"detector must be one of ['adwin', 'page_hinkley', 'kswin'], got {cfg.detector!r}")


class Track:
    """Detection bookkeeping of one judged stream (inputs, residuals, level) of one channel."""

    __slots__ = ("detections", "since_reset", "last_t")

    def __init__(self) -> None:
        self.detections = 0
        self.since_reset = 0
        self.last_t: float | None = None

    def record(self, t: float) -> None:
        self.detections += 1
        self.since_reset += 1
        self.last_t = t

    def status(self) -> DriftTrackStatus:
        return {
            "state": "drift" if self.since_reset else "stable",
            "detections": self.detections,
            "last_detected": iso8601(self.last_t),
        }


class Channel:
    """Detectors and levels of one channel."""

    def __init__(
        self,
        name: str,
        index: int,
        cfg: DriftConfig,
        center: float | None,
        scale: float | None,
        shift: ReferenceShift | None = None,
        residual_window: ResidualRatio | None = None,
        residual_cusum: CUSUM | None = None,
        residual_profile: TimeOfDayProfile | None = None,
        level: LevelJudge | None = None,
    ) -> None:
        self.name = name
        # A channel in [drift] level_channels: its level against the same time of day (a reason
        # to adapt, like residual drift), with its own detections and the time the shift began.
        self.level_judge = level
        self.level = Track()
        self.level_change_from: float | None = None
        # cfg.residuals == "window": the rolling mean |residual| against its first window,
        # and (cfg.cusum) a CUSUM on every |residual| that sees an abrupt shift in minutes.
        self.residual_window = residual_window
        self.residual_cusum = residual_cusum
        # (cfg.cusum_by_time_of_day) the CUSUM reads each |residual| over the typical one at that
        # time of day on earlier days, so the daily swing of the model's error is not a shift.
        self.residual_profile = residual_profile
        # The CUSUM reads means of `cusum_block` values: per step |residuals| are heavy-tailed (their
        # std is twice their mean on the sample motor), their means over half a minute nearly normal.
        self.cusum_sum = 0.0
        self.cusum_count = 0
        # One alert an episode whichever judge sees it first: set by a detection, cleared
        # once both judges are back to normal (see residual_episode_over).
        self.residual_episode = False
        self.residual_episode_steps = 0  # residuals seen since the episode began
        # When the residuals began to drift, as well as the judges can tell (the CUSUM's onset, or
        # the start of the window that drifted): the first since the last reset. An update
        # started by drift trains on the data from there on.
        self.residual_change_from: float | None = None
        # cfg.inputs == "reference": the rolling window against the training data, and no
        # per-value input detectors.
        self.shift = shift
        self.inputs = Track()
        self.residuals = Track()
        seed = 1000 * index
        # The value detector sees level changes. ADWIN and Page-Hinkley are
        # blind to a change of spread, and KSWIN on short windows nearly so
        # (sd x2 went unseen on 10 of 10 seeded streams), so a second detector
        # watches |step-to-step change|, whose mean scales with the noise and
        # not with the level. Only the "stream" modes have per-value detectors.
        stream_inputs, stream_residuals = cfg.inputs == "stream", cfg.residuals == "stream"
        self.level_detector = make_detector(cfg, kind="inputs", seed=seed) if stream_inputs else None
        self.spread_detector = make_detector(cfg, kind="inputs", seed=seed + 1) if stream_inputs else None
        self.residual_detector = make_detector(cfg, kind="residuals", seed=seed + 2) if stream_residuals else None
        # Inputs are standardised so detector thresholds mean the same on
        # every channel; without given stats the first values estimate them.
        self.center = center
        self.scale = scale
        self.input_samples = 0  # finite values since start-up or the last input drift
        self.warm_mean = 0.0
        self.warm_m2 = 0.0
        self.previous_z: float | None = None
        # Residual level (EWMA of |residual|) and the baseline it is judged by.
        self.residual_samples = 0
        self.residual_level: float | None = None
        self.residual_baseline: float | None = None
        self.baseline_sum = 0.0
        # What the model's held-out validation residuals say is typical at each UTC hour (drift/prior.py),
        # after start-up or the last accepted adapter; None: the judges learn from the stream alone.
        self.residual_expected: list[float | None] | None = None

    def restart_inputs(self) -> None:
        """After input drift: learn the new regime's scale, then watch it afresh.

        With the old scale frozen, a regime of larger spread would look like
        drift again and again to Page-Hinkley, whose threshold is absolute.
        """
        assert self.level_detector is not None and self.spread_detector is not None
        self.level_detector.reset()
        self.spread_detector.reset()
        self.center = self.scale = self.previous_z = None
        self.input_samples = 0
        self.warm_mean = self.warm_m2 = 0.0

    def reset_residuals(self) -> None:
        if self.residual_window is not None:
            self.residual_window.reset()
        if self.residual_cusum is not None:
            self.residual_cusum.reset()
        self.cusum_sum, self.cusum_count = 0.0, 0
        self.residual_episode = False
        self.residual_episode_steps = 0
        self.residual_change_from = None
        if self.residual_detector is not None:
            self.residual_detector.reset()
        self.residual_samples = 0
        self.residual_level = None
        self.residual_baseline = None
        self.baseline_sum = 0.0
        self.inputs.since_reset = 0
        self.residuals.since_reset = 0

    def reset_level(self) -> None:
        """An adapter serves (or a new base): a level shift seen before is no reason to adapt
        again. The judge itself goes on: a shift under way stays one episode, learnt by none of
        its slices, until the level is back to normal or, after a day of it, the new normal."""
        self.level.since_reset = 0
        self.level_change_from = None

    @property
    def detections(self) -> int:
        return self.inputs.detections + self.residuals.detections + self.level.detections

    @property
    def last_t(self) -> float | None:
        times = [t for t in (self.inputs.last_t, self.residuals.last_t, self.level.last_t) if t is not None]
        return max(times) if times else None

    @property
    def drifted(self) -> bool:
        """Any detection (inputs, residuals, level) since the last reset."""
        return bool(self.inputs.since_reset or self.residuals.since_reset or self.level.since_reset)

    def status(self) -> ChannelDriftStatus:
        drifted = self.drifted
        return {
            "state": "drift" if drifted else "stable",
            "detections": self.detections,
            "last_detected": iso8601(self.last_t),
            "inputs": self.inputs.status(),
            "residuals": self.residuals.status(),
            "residual_level": self.residual_level,
            "residual_baseline": self.residual_baseline,
            "samples": {"inputs": self.input_samples, "residuals": self.residual_samples},
            **({} if self.shift is None else {"psi": self._psi_status()}),
            # residual_change_from: where an update after this drift starts its recent data.
            **({} if self.residual_window is None else {
                "residual_window": self._window_status(), "residual_change_from": iso8601(self.residual_change_from)}),
            **({} if self.residual_cusum is None else {"residual_cusum": self._cusum_status()}),
            **({} if self.level_judge is None else {"level": self._level_status()}),
        }

    def _level_status(self) -> LevelStatus:
        judge = self.level_judge
        assert judge is not None
        return {
            **self.level.status(),
            "statistic": round(judge.statistic, 3),
            "threshold": judge.h,
            "judging": judge.state,
            "time_of_day_learnt": round(judge.learnt_fraction, 3),
            "change_from": iso8601(self.level_change_from),
        }

    def _cusum_status(self) -> CusumStatus:
        cusum, profile = self.residual_cusum, self.residual_profile
        assert cusum is not None
        return {
            "statistic": round(cusum.statistic, 3),
            "threshold": cusum.h,
            "state": self._cusum_state(),
            "samples": cusum.samples,
            **({} if profile is None else {"time_of_day_learnt": round(profile.learnt_fraction, 3)}),
        }

    def _cusum_state(self) -> Literal["learning", "validation", "watching"]:
        """"validation": watching against what the held-out residuals say is normal, not yet
        refined by a whole day of the stream; "learning": silent until it has learnt that."""
        cusum, profile = self.residual_cusum, self.residual_profile
        assert cusum is not None
        if cusum.learning:
            return "learning"
        if profile is not None and profile.seeded:
            return "validation"
        if profile is not None and not profile.ready:
            return "learning"
        return "validation" if self.residual_expected is not None and self.residual_window is not None and self.residual_window.prior else "watching"

    def _window_status(self) -> ResidualWindowStatus:
        window = self.residual_window
        assert window is not None
        return {
            "ratio": None if window.ratio is None else round(window.ratio, 3),
            "threshold": window.threshold,
            "baseline": "validation" if window.prior else "learning" if window.baseline is None else "first window",
            "window_filled": round(window.filled / window.window, 3),
        }

    def _psi_status(self) -> PsiStatus:
        shift = self.shift
        assert shift is not None
        learning = shift.reference is None or shift.filled < shift.window
        return {
            "value": None if shift.last_psi is None else round(shift.last_psi, 4),
            "threshold": shift.threshold,
            "reference": "learning" if shift.reference is None else "first window" if shift.learned else "training data",
            "window_filled": round(shift.filled / shift.window, 3) if learning else 1.0,
        }


def residual_episode_over(channel: Channel) -> bool:
    """Both residual judges are back to normal: the CUSUM has re-learnt the level after its
    detection, and the window, once it holds only residuals from after the episode began
    (it lags: half a day to see what the CUSUM saw in minutes), has its ratio under the
    re-arm mark (or is still learning its baseline). A shift the CUSUM saw in minutes and
    the window confirms later is then one episode, one alert."""
    window, cusum = channel.residual_window, channel.residual_cusum
    assert window is not None
    if cusum is not None and cusum.learning and (channel.residual_profile is None or channel.residual_profile.ready):
        return False
    if window.baseline is None:
        return True
    if channel.residual_episode_steps < window.window or window.drifted:
        return False
    return window.ratio is not None and window.ratio < window.rearm
