"""The validation gate: a model's mean loss on held-out windows, and whether an adapter's
losses beat the incumbent's (better on recent windows, not much worse on replayed ones, the
replayed loss weighed by how likely the old regime is to return: `training.recurrence`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from edge_daemon.model import forecast_loss
from edge_daemon.control.replies import AttemptJson, GateJson
from edge_daemon.training.recurrence import Recurrence, weigh_limit


def evaluate_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float | None:
    """Mean next-step loss (`forecast_loss`) over `windows` (None when there are none), without autograd."""
    if len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode():
            for chunk in windows.split(max(1, batch_size)):
                # forecast_loss averages per chunk; weight by size for the exact overall mean.
                total += float(forecast_loss(model, chunk)) * len(chunk)
    finally:
        model.train(was_training)
    return total / len(windows)


def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor | None:
    """`forecast_loss` of each window on its own, (N,) (None when there are none), without autograd."""
    if len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        with torch.inference_mode():
            out = []
            for chunk in windows.split(max(1, batch_size)):
                # forecast_loss's positions and horizons, averaged per window instead of over the batch.
                inputs = chunk[:, :-1]
                T = inputs.shape[1]
                first = min(T // 2, T - 1)
                predicted = inner.forward_horizons(inputs)
                C = predicted.shape[-1]
                per = [
                    (predicted[:, first : T - h + 1, i] - chunk[:, first + h : T + 1, :C]).abs().mean(dim=(1, 2))
                    for i, h in enumerate(inner.cfg.horizons)
                    if first <= T - h
                ]
                out.append(torch.stack(per).mean(dim=0))
            return torch.cat(out)
    finally:
        model.train(was_training)


def median_gain(before: torch.Tensor, after: torch.Tensor) -> float:
    """How much lower the adapter's loss is in the median window, paired with the incumbent's on the
    same window, as a share of the incumbent's median loss (0.12: 12% lower; negative: worse)."""
    scale = float(before.median())
    return -float((after - before).median()) / scale if scale > 0 else 0.0


@dataclass
class GateVerdict:
    accepted: bool
    reason: str
    weight: float = 1.0
    forgetting: float | None = None
    allowed_forgetting: float | None = None
    failed_on: Literal["recent", "forgetting"] | None = None
    evidence: Recurrence | None = None
    attempts: list[AttemptJson] = field(default_factory=list)

    def to_json(self) -> GateJson:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "weight": self.weight,
            "forgetting": self.forgetting,
            "allowed_forgetting": None if self.allowed_forgetting is None or math.isinf(self.allowed_forgetting) else self.allowed_forgetting,
            "failed_on": self.failed_on,
            "evidence": None if self.evidence is None else self.evidence.to_json(),
            "attempts": list(self.attempts),
        }


def judge(
    before: dict[str, float | None],
    after: dict[str, float | None],
    tolerance: float,
    min_improvement: float = 0.0,
    recurrence: Recurrence | None = None,
    recent_windows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GateVerdict:
    """Accept iff the recent loss improves and the replayed loss's worsening, weighed by how likely
    the old regime is to return (`recurrence.weight`; none: 1, the fixed rule), is within `tolerance`.

    With `recent_windows` (the incumbent's and the adapter's loss on each recent held-out window)
    "improves" is judged in the median window (`median_gain`), else by the mean losses."""
    weight = 1.0 if recurrence is None else recurrence.weight
    evidence = "" if recurrence is None else recurrence.summary + "; "
    recent_before, recent_after = before["recent_val_loss"], after["recent_val_loss"]
    if recent_before is None or recent_after is None:
        return GateVerdict(False, "no recent validation windows", weight, failed_on="recent", evidence=recurrence)
    if not math.isfinite(recent_after):
        return GateVerdict(False, f"recent validation loss is {recent_after}", weight, failed_on="recent", evidence=recurrence)
    if recent_windows is not None:
        gain = median_gain(*recent_windows)
        if not gain > min_improvement:
            return GateVerdict(
                False,
                f"rejected: recent loss does not improve in the median held-out window ({-gain:+.0%}; "
                f"mean {recent_after:.5g} against {recent_before:.5g})",
                weight, failed_on="recent", evidence=recurrence,
            )  # fmt: skip
    else:
        needed = recent_before * (1.0 - min_improvement)
        gain = 1.0 - recent_after / recent_before if recent_before > 0 else 0.0
        if not recent_after < needed:
            return GateVerdict(
                False, f"rejected: recent loss {recent_after:.5g} does not improve on {recent_before:.5g}", weight,
                failed_on="recent", evidence=recurrence,
            )  # fmt: skip
    replay_before, replay_after = before["replay_val_loss"], after["replay_val_loss"]
    if replay_before is None or replay_after is None or replay_before <= 0:
        where = " in the median held-out window" if recent_windows is not None else ""
        return GateVerdict(True, f"accepted: recent loss {gain:.0%} lower{where} (no older data to check forgetting)", weight, evidence=recurrence)
    forgetting = replay_after / replay_before - 1.0
    allowed = weigh_limit(tolerance, weight)
    limit = "no limit" if math.isinf(allowed) else f"at most {allowed:.0%}"
    counts = f" ({limit})" if weight >= 1.0 else f" (the old regime counts {weight:.2g}: {limit})"
    if not math.isfinite(replay_after) or not forgetting <= allowed:
        return GateVerdict(
            False,
            f"{evidence}rejected: it forgets the old regime by {forgetting:.0%}, more than it may{counts}",
            weight, forgetting, allowed, "forgetting", recurrence,
        )  # fmt: skip
    if forgetting > 0:
        how = f"accepted although it forgets the old regime by {forgetting:.0%}{counts}"
    else:
        how = f"accepted; the old regime's loss {-forgetting:.0%} lower too"
    where = " in the median held-out window" if recent_windows is not None else ""
    return GateVerdict(True, f"{evidence}{how}; recent loss {gain:.0%} lower{where}", weight, forgetting, allowed, None, recurrence)


def gate(before: dict[str, float | None], after: dict[str, float | None], tolerance: float, min_improvement: float = 0.0) -> tuple[bool, str]:
    """The fixed rule (weight 1): accept iff recent loss improves and replayed loss worsens by at most `tolerance`."""
    verdict = judge(before, after, tolerance, min_improvement)
    return verdict.accepted, verdict.reason


__all__ = ["AttemptJson", "GateJson", "GateVerdict", "evaluate_loss", "gate", "judge", "median_gain", "window_losses"]
