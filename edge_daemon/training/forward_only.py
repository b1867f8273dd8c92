"""Forward-only (zeroth-order) updates: the adapter trained with forward passes alone.

SPSA as MeZO (Malladi et al., 2023) uses it: each step draws a random direction z
for every trainable weight, measures the batch loss at theta + eps z and theta -
eps z, and moves theta along z by the measured slope, (L+ - L-) / 2 eps, whose
expectation over z is the gradient. z is never stored: it is drawn again from
its seed each time it is needed, one parameter at a time, so the update holds
no gradient, no activations for a backward and no copy of the weights. Its
memory is that of a scoring pass over one micro-batch (plus the adapter's own
weights, already there). The price is noise: a step follows one random
direction, so it takes many more steps than backpropagation, each of two
forwards.

The step moves along z by the slope times the learning rate divided by the
number of weights, the plain SGD rule MeZO uses with its learning rate made
independent of the adapter's size: a random direction's step carries noise
that grows with the number of weights (z's squared length is about that
number), and the same `[train] forward_only_lr` then holds for any adapter
(measured on the sample motor: stable at 15, diverging at 60).
`FORWARD_ONLY_CLIP` bounds a step's slope so one noisy batch cannot throw the
adapter far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from edge_daemon.model import forecast_loss

# A step's slope is clipped to this many (normalised) loss units per unit of eps: the rare batch
# whose two losses differ wildly (a spike in one window) moves the adapter no further than a
# typical one.
FORWARD_ONLY_CLIP = 5.0


class Direction:
    """A random direction over `params`, drawn from `seed` whenever it is used, never kept."""

    def __init__(self, params: Sequence[nn.Parameter], seed: int) -> None:
        self.params = params
        self.seed = seed

    def _draws(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for param in self.params:
            yield param, torch.randn(param.shape, generator=generator, dtype=param.dtype)

    @torch.no_grad()
    def move(self, scale: float) -> None:
        """theta += scale * z, one parameter at a time."""
        for param, z in self._draws():
            param.add_(z, alpha=scale)


@torch.inference_mode()
def batch_loss(model: nn.Module, windows: torch.Tensor, micro_batch: int) -> float:
    """The forecast loss of `windows` (N, T+1, C), the mean over micro-batches weighed by their size."""
    total = 0.0
    for start in range(0, len(windows), micro_batch):
        chunk = windows[start : start + micro_batch]
        total += float(forecast_loss(model, chunk)) * len(chunk)
    return total / len(windows)


def forward_only_step(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    windows: torch.Tensor,
    micro_batch: int,
    lr: float,
    eps: float,
    seed: int,
    penalty: Callable[[], float] | None = None,
) -> tuple[float, float]:
    """One SPSA step on `windows`; returns (the batch loss at theta, the slope along z).

    `penalty()` (the retry's pull toward the start) is added to both losses. The loss at theta is
    the mean of the two perturbed ones (exact to second order in eps).
    """

    def objective() -> float:
        loss = batch_loss(model, windows, micro_batch)
        return loss + penalty() if penalty is not None else loss

    direction = Direction(params, seed)
    direction.move(eps)
    plus = objective()
    direction.move(-2.0 * eps)
    minus = objective()
    direction.move(eps)
    slope = (plus - minus) / (2.0 * eps)
    if not (abs(slope) < float("inf")):
        return (plus + minus) / 2.0, slope  # the caller reports a non-finite loss
    clipped = max(-FORWARD_ONLY_CLIP, min(FORWARD_ONLY_CLIP, slope))
    n_weights = sum(p.numel() for p in params)
    direction.move(-lr * clipped / max(1, n_weights))
    return (plus + minus) / 2.0, slope


__all__ = ["FORWARD_ONLY_CLIP", "Direction", "batch_loss", "forward_only_step"]
