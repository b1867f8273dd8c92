"""Merging LoRA adapters from many devices into one, exactly.

A LoRA adapter changes a weight W by scale * B @ A (A is (r, in), B is (out, r), scale is
alpha / r). The fleet's update is the mean of the devices' changes, weighted by the windows each
trained on: mean_i(w_i * B_i @ A_i). Averaging the factors instead (FedAvg of A and of B, as
Flower's LoRA example does) gives mean(B) @ mean(A), which is not that mean: the cross terms
B_i @ A_j of different devices enter it, and a device's change can cancel itself out.

`exact_merge` forms each module's mean change and factorises it again by SVD. Up to the rank the
changes span together (at most the devices' ranks added up) the result is that mean within float
precision; truncated to a smaller rank it is the closest change of that rank (Eckart-Young), and
the part left out is reported. A module one device did not adapt counts as no change from it.
Numpy only: the server side needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Singular values below this share of the largest are rounding, not rank.
RANK_TOLERANCE = 1e-6

Factors = Mapping[str, tuple[np.ndarray, np.ndarray]]  # module name -> (A (r, in), B (out, r))


@dataclass(frozen=True)
class DeviceUpdate:
    """One device's adapter after a round: its factors per module and how many training windows
    it learnt them from (its weight in the mean)."""

    factors: Factors
    windows: int


@dataclass(frozen=True)
class Merged:
    """The merged adapter's factors (scale * B @ A per module, as the devices' adapters) and, per
    module, the share of the mean change its rank leaves out (Frobenius norm; 0 where exact)."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: dict[str, int]
    left_out: dict[str, float]


def _weights(updates: Sequence[DeviceUpdate]) -> np.ndarray:
    if not updates:
        raise ValueError("no device updates to merge")
    windows = np.array([u.windows for u in updates], dtype=np.float64)
    if (windows < 0).any() or windows.sum() <= 0:
        raise ValueError(f"window counts must be >= 0 and not all 0, got {windows.tolist()}")
    return windows / windows.sum()


def _shapes(updates: Sequence[DeviceUpdate]) -> dict[str, tuple[int, int]]:
    """(out, in) of every module any device adapted; ValueError where two devices disagree."""
    shapes: dict[str, tuple[int, int]] = {}
    for update in updates:
        for name, (a, b) in update.factors.items():
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"{name}: factors of shapes A {a.shape}, B {b.shape} do not make a LoRA")
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}: devices disagree on its shape ({shapes[name]} and {shape})")
    return shapes


def mean_delta(updates: Sequence[DeviceUpdate], scale: float) -> dict[str, np.ndarray]:
    """Each module's weighted mean change, scale * sum_i(w_i * B_i @ A_i), in float64."""
    weights = _weights(updates)
    deltas = {name: np.zeros(shape) for name, shape in _shapes(updates).items()}
    for weight, update in zip(weights, updates, strict=True):
        for name, (a, b) in update.factors.items():
            deltas[name] += weight * scale * (b.astype(np.float64) @ a.astype(np.float64))
    return deltas


def exact_merge(updates: Sequence[DeviceUpdate], scale: float, rank: int | None = None) -> Merged:
    """The weighted mean change of every module, factorised again as scale * B @ A.

    `rank`: the merged factors' rank; None keeps every singular value above rounding (the exact
    mean). The singular values are split evenly between B and A (B = U sqrt(S), A = sqrt(S) V^T,
    each over sqrt(scale)), so neither factor dwarfs the other when training goes on from them.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    left_out: dict[str, float] = {}
    for name, delta in mean_delta(updates, scale).items():
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        spanned = int((s > RANK_TOLERANCE * s[0]).sum()) if s.size and s[0] > 0 else 0
        keep = max(1, spanned if rank is None else min(rank, len(s)))
        root = np.sqrt(s[:keep] / scale)
        b = (u[:, :keep] * root).astype(np.float32)
        a = (root[:, None] * vt[:keep]).astype(np.float32)
        factors[name] = (a, b)
        ranks[name] = keep
        total = float(np.sqrt((s**2).sum()))
        left_out[name] = float(np.sqrt((s[keep:] ** 2).sum())) / total if total > 0 else 0.0
    return Merged(factors, ranks, left_out)


def fedavg_factors(updates: Sequence[DeviceUpdate]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The baseline: A and B each averaged on their own, weighted by windows (a module a device
    did not adapt counts as zero factors from it). Its change is mean(B) @ mean(A), not the mean
    change."""
    weights = _weights(updates)
    ranks: dict[str, int] = {}
    for update in updates:
        for name, (a, _b) in update.factors.items():
            if ranks.setdefault(name, a.shape[0]) != a.shape[0]:
                raise ValueError(f"{name}: FedAvg of factors needs one rank on every device ({ranks[name]} and {a.shape[0]})")
    shapes = _shapes(updates)
    sums = {name: (np.zeros((ranks[name], n_in)), np.zeros((n_out, ranks[name]))) for name, (n_out, n_in) in shapes.items()}
    for weight, update in zip(weights, updates, strict=True):
        for name, (a, b) in update.factors.items():
            sums[name][0][...] += weight * a
            sums[name][1][...] += weight * b
    return {name: (a.astype(np.float32), b.astype(np.float32)) for name, (a, b) in sums.items()}


def change_of(factors: Factors, scale: float) -> dict[str, np.ndarray]:
    """scale * B @ A of every module: the change an adapter makes to the weights."""
    return {name: scale * (b.astype(np.float64) @ a.astype(np.float64)) for name, (a, b) in factors.items()}


__all__ = ["DeviceUpdate", "Merged", "change_of", "exact_merge", "fedavg_factors", "mean_delta"]
