"""The validation gate: a model's mean loss on held-out windows, and whether an adapter's
losses beat the incumbent's (better on recent windows, not much worse on replayed ones)."""

from __future__ import annotations

import math

import torch
from torch import nn

from edge_daemon.model import forecast_loss


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


def gate(before: dict[str, float | None], after: dict[str, float | None], tolerance: float, min_improvement: float = 0.0) -> tuple[bool, str]:
    """Accept iff recent loss improves and replayed loss worsens by at most `tolerance` (a fraction)."""
    recent_before, recent_after = before["recent_val_loss"], after["recent_val_loss"]
    if recent_before is None or recent_after is None:
        return False, "no recent validation windows"
    if not math.isfinite(recent_after):
        return False, f"recent validation loss is {recent_after}"
    needed = recent_before * (1.0 - min_improvement)
    if not recent_after < needed:
        return False, f"recent loss {recent_after:.5g} does not improve on {recent_before:.5g}"
    replay_before, replay_after = before["replay_val_loss"], after["replay_val_loss"]
    if replay_before is not None and replay_after is not None:
        allowed = replay_before * (1.0 + tolerance)
        if not replay_after <= allowed:
            return False, f"replay loss {replay_after:.5g} worse than {replay_before:.5g} by more than {tolerance:.0%}"
        return True, f"recent loss {recent_before:.5g} -> {recent_after:.5g}, replay {replay_before:.5g} -> {replay_after:.5g}"
    return True, f"recent loss {recent_before:.5g} -> {recent_after:.5g} (no replay windows to check)"


__all__ = ["evaluate_loss", "gate"]
