"""How likely the old regime is to come back, from the store's own history: the weight the gate
gives the replayed (old-data) loss.

The store is cut into buckets (`BUCKET_S`); each bucket's signature is its per-channel mean and
standard deviation (aggregated in SQLite, `ReplayStore.bucket_stats`). Two prototypes: the
update's recent data (since the change) and as long a stretch just before it (the regime the
incumbent learned). The features on which the two differ by at least `DISTINCT_Z` pooled standard
deviations are the change; every bucket of history is labelled by the nearer prototype on those
features, one-bucket runs are smoothed away, and the label runs tell:

- how long the new regime has persisted (the current run of "new" buckets),
- how many times before the device was in a regime like the new one and the old one came back
  (`returns`), and after how long an absence at most (`longest_absence_s`).

The rule (`weigh`), with `m` = `[train] gate_min_weight` and `S` = `[train] gate_settle_hours`:

- the recent data do not differ from before (no feature apart): w = 1, today's fixed rule;
- the old regime came back before (returns >= 1): w = 1 while the current absence is at most
  1.5 times the longest absence it came back from, then falling as 1.5 x longest / absence (not
  below m): a device that cycles is held to the full tolerance, one that has stayed away far
  longer than ever before is let go gradually;
- the old regime never came back after a change like this one: w falls linearly from 1 to m over
  the first S hours of the new regime: a change seen for S hours and never reversed counts as
  permanent, and forgetting the old regime is allowed up to tolerance / m.

No torch here: numpy on a few hundred buckets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_daemon.control.replies import RecurrenceJson

# Buckets of this long summarise history; runs of one bucket are taken as noise.
BUCKET_S = 600.0
# The old regime's prototype: the buckets of this long before the change (a day: its daily cycle).
OLD_SPAN_S = 86400.0
# A feature whose recent mean lies this many of the old day's standard deviations from the old
# day's mean marks a regime change.
DISTINCT_Z = 2.0
# A cycling device's old regime counts in full while it has been away at most this many times its
# longest absence before a return.
ABSENCE_SLACK = 1.5


@dataclass(frozen=True)
class Recurrence:
    """The old regime's chance of return as the gate's weight, with the evidence in words."""

    weight: float  # in [0, 1]: the share of the replayed loss's worsening that counts
    distinct: bool  # the recent data differ from the data before them
    changed: list[str]  # the features that differ ("m1/vibration mean", ...)
    persists_s: float | None  # how long the new regime has lasted (data's clock)
    old_seen_s: float | None  # how long before the newest reading the old regime was last seen
    returns: int  # earlier times the device was in a regime like the new one and the old came back
    longest_absence_s: float | None  # the longest of those absences
    buckets: int  # buckets of history judged
    summary: str  # the evidence in words, for the gate's reason

    def to_json(self) -> RecurrenceJson:
        return asdict(self)  # type: ignore[return-value]  # the fields are RecurrenceJson's keys


def full_weight(summary: str) -> Recurrence:
    """No evidence either way: the old regime counts in full (today's fixed rule)."""
    return Recurrence(1.0, False, [], None, None, 0, None, 0, summary)


def duration(seconds: float | None) -> str:
    """A span for operators: '40 min', '3 h', '2.5 d'."""
    if seconds is None:
        return "unknown"
    if seconds < 90 * 60:
        return f"{max(1, round(seconds / 60))} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"


def bucket_signatures(ts: np.ndarray, values: np.ndarray, bucket_s: float = BUCKET_S) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `ReplayStore.bucket_stats` returns, from (N,) times and (N, C) readings (NaN: none)."""
    keys = np.floor(np.asarray(ts, dtype=np.float64) / bucket_s).astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    n_ch = values.shape[1]
    counts = np.zeros((len(uniq), n_ch), dtype=np.int64)
    stats = np.full((len(uniq), n_ch, 2), np.nan)
    for c in range(n_ch):
        ok = np.isfinite(values[:, c])
        n = np.bincount(inverse[ok], minlength=len(uniq))
        s1 = np.bincount(inverse[ok], weights=values[ok, c], minlength=len(uniq))
        s2 = np.bincount(inverse[ok], weights=values[ok, c] ** 2, minlength=len(uniq))
        has = n > 0
        mean = np.where(has, s1 / np.maximum(n, 1), np.nan)
        var = np.where(has, s2 / np.maximum(n, 1) - mean**2, np.nan)
        counts[:, c] = n
        stats[:, c, 0] = mean
        stats[:, c, 1] = np.sqrt(np.maximum(var, 0.0))
    return uniq.astype(np.float64) * bucket_s, counts, stats


def _runs(labels: np.ndarray) -> list[tuple[bool, int, int]]:
    """(label, first, last) of each run of equal labels."""
    runs: list[tuple[bool, int, int]] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((bool(labels[start]), start, i - 1))
            start = i
    return runs


def estimate(
    starts: np.ndarray,
    counts: np.ndarray,
    stats: np.ndarray,
    channels: list[str],
    cutoff: float,
    newest: float,
    *,
    min_weight: float,
    settle_hours: float,
    bucket_s: float = BUCKET_S,
) -> Recurrence:
    """The old regime's weight from bucket signatures (`ReplayStore.bucket_stats`), the update's
    cutoff (recent data start) and its newest reading."""
    if len(starts) == 0:
        return full_weight("no history to judge: the old data count in full")
    # Whole buckets only: at least half the typical count on every channel.
    typical = np.median(counts, axis=0)
    whole = np.all(counts >= np.maximum(1, typical / 2), axis=1) & np.all(np.isfinite(stats.reshape(len(starts), -1)), axis=1)
    starts, feats = starts[whole], stats[whole].reshape(int(whole.sum()), -1)
    names = [f"{ch} {kind}" for ch in channels for kind in ("mean", "spread")]
    mids = starts + bucket_s / 2
    is_new = mids >= cutoff
    n_new = int(is_new.sum())
    before = np.flatnonzero(~is_new)
    if n_new < 2 or len(before) < 2:
        return full_weight("too little history on either side of the change to judge: the old data count in full")
    # The old regime: the day before the change (its daily cycle included), or what there is of it.
    old_idx = before[mids[before] >= cutoff - OLD_SPAN_S]
    if len(old_idx) < 2:
        old_idx = before[-2:]
    # Each channel's mean against what the other channels' means say it is in the old day (a
    # least-squares fit): a recalibrated sensor stands out there, not among the daily cycle's levels.
    n_ch = len(channels)
    if n_ch > 1 and len(old_idx) >= n_ch + 2:
        means = feats[:, 0::2]
        extra = []
        for c in range(n_ch):
            x = np.column_stack([np.ones(len(means)), np.delete(means, c, axis=1)])
            coef, *_ = np.linalg.lstsq(x[old_idx], means[old_idx, c], rcond=None)
            extra.append(means[:, c] - x @ coef)
        feats = np.column_stack([feats, *extra])
        names = names + [f"{ch} against the others" for ch in channels]
    new_f, old_f = feats[is_new], feats[old_idx]
    mu_new, mu_old = new_f.mean(axis=0), old_f.mean(axis=0)
    floor = 0.02 * feats.std(axis=0) + 1e-6
    sd_new, sd_old = new_f.std(axis=0) + floor, old_f.std(axis=0) + floor
    # Apart: the new mean lies outside the old day's own variation on that feature.
    z = np.abs(mu_new - mu_old) / sd_old
    apart = z >= DISTINCT_Z
    if not apart.any():
        return Recurrence(
            1.0, False, [], None, None, 0, None, len(starts),
            "recent data look like the data before them: the old data count in full",
        )  # fmt: skip
    changed = [names[i] for i in np.argsort(-z) if apart[i]]
    d_new = np.linalg.norm((feats[:, apart] - mu_new[apart]) / sd_new[apart], axis=1)
    d_old = np.linalg.norm((feats[:, apart] - mu_old[apart]) / sd_old[apart], axis=1)
    labels = d_new < d_old
    # One bucket is noise: it takes its neighbours' label when they agree.
    for i in range(1, len(labels) - 1):
        if labels[i - 1] == labels[i + 1] != labels[i]:
            labels[i] = labels[i - 1]
    runs = _runs(labels)
    last_label, first, _ = runs[-1]
    if not last_label:  # the newest buckets look old: the "change" has already reversed
        return Recurrence(
            1.0, True, changed, None, 0.0, 0, None, len(starts),
            "the newest data look like the old regime again: the old data count in full",
        )  # fmt: skip
    run_start = float(starts[first])
    persists = max(0.0, newest - run_start)
    old_seen = persists if len(runs) > 1 else None
    returns, longest = 0, 0.0
    for label, a, b in runs[:-1]:  # runs alternate: every earlier "new" run was followed by an old one
        if label:
            returns += 1
            longest = max(longest, float(starts[b]) + bucket_s - float(starts[a]))
    what = ", ".join(changed[:2])
    since = f"new regime ({what} changed) persists for {duration(persists)}"
    if returns:
        limit = ABSENCE_SLACK * longest
        weight = 1.0 if persists <= limit else max(min_weight, limit / persists)
        summary = (
            f"{since}; the old regime came back {returns} time{'s' if returns > 1 else ''} before, "
            f"after at most {duration(longest)} away"
        )
    else:
        settle = settle_hours * 3600.0
        weight = max(min_weight, 1.0 - (1.0 - min_weight) * min(1.0, persists / settle)) if settle > 0 else min_weight
        summary = f"{since}; old regime not seen since" + ("" if old_seen is not None else " (nothing older judged)")
        summary += ", and never came back after a change like it"
    return Recurrence(
        round(float(weight), 4), True, changed, persists, old_seen, returns,
        longest if returns else None, len(starts), summary,
    )  # fmt: skip


def from_store(store: Any, channels: list[str], cutoff: float, newest: float, *, min_weight: float, settle_hours: float) -> Recurrence:
    """`estimate` on the store's bucket signatures."""
    starts, counts, stats = store.bucket_stats(BUCKET_S)
    return estimate(starts, counts, stats, channels, cutoff, newest, min_weight=min_weight, settle_hours=settle_hours)


def weigh_limit(tolerance: float, weight: float) -> float:
    """The replayed loss's allowed worsening at weight w: tolerance / w (infinite at w = 0)."""
    return math.inf if weight <= 0 else tolerance / weight


__all__ = ["BUCKET_S", "Recurrence", "RecurrenceJson", "bucket_signatures", "duration", "estimate", "from_store", "full_weight", "weigh_limit"]
