"""The gate weighs the old regime by its chance of return (real small torch training, seeded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
from edge_daemon.training.gate import judge
from edge_daemon.training.loop import UpdateResult, update
from edge_daemon.training.plan import plan_from_config
from edge_daemon.training.recurrence import Recurrence, bucket_signatures, estimate

# Small models on shared cores: a second thread only contends.
torch.set_num_threads(1)

WINDOW = 16
CHANNELS = ["m/a", "m/b"]


def regime(n: int, period: float, offset: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)
    main = torch.sin(2 * math.pi * t / period + float(torch.rand(1, generator=g)) * 6.28)
    x = torch.stack([main + offset, torch.roll(main, 3) * (1.0 if offset == 0 else -1.0)], dim=-1)
    return x + 0.05 * torch.randn(n, 2, generator=g)


def windows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unfold(0, WINDOW + 1, 3).permute(0, 2, 1)[:n].contiguous()


@pytest.fixture(scope="module")
def setup() -> tuple[Forecaster, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = Forecaster(ForecasterConfig(n_channels=2, window=WINDOW, d_model=16, n_heads=2, n_layers=1, d_ff=32))
    old = windows(regime(2000, 12.0, 0.0, 1), 256)
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = forecast_loss(base, old[torch.randint(0, len(old), (32,), generator=g)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base.eval()
    data = {
        "recent_train": windows(regime(1200, 7.0, 1.5, 2), 96),
        "recent_val": windows(regime(400, 7.0, 1.5, 3), 24),
        "replay_train": windows(regime(1200, 12.0, 0.0, 4), 96),
        "replay_val": windows(regime(400, 12.0, 0.0, 5), 24),
    }
    return base, data


def history(alternating: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Three days at 60 s with a daily cycle; the new regime (level +3 on one channel) for the last
    2 h, and for the whole of day 1 when `alternating`."""
    period, day = 60.0, 1440
    n = 3 * day + 120
    ts = 1.7e9 + np.arange(n) * period
    rng = np.random.default_rng(0)
    daily = np.sin(2 * np.pi * np.arange(n) / day)
    values = np.stack([daily + 0.1 * rng.normal(size=n), daily + 0.1 * rng.normal(size=n)], 1)
    new = np.arange(n) >= 3 * day
    if alternating:
        new |= (np.arange(n) // day) == 1
    values[new, 0] += 3.0
    starts, counts, stats = bucket_signatures(ts, values)
    return starts, counts, stats, float(ts[3 * day]), float(ts[-1])


def recurrence(alternating: bool) -> Recurrence:
    starts, counts, stats, cutoff, newest = history(alternating)
    return estimate(starts, counts, stats, CHANNELS, cutoff, newest, min_weight=0.05, settle_hours=1.0)


def cfg(**kw: object) -> TrainConfig:
    # No replay: learning the new regime forgets the old far beyond the tolerance.
    return TrainConfig(**{"steps": 15, "batch_size": 16, "micro_batch": 16, "lr": 1e-2, "replay_fraction": 0.0, "gate_tolerance": 0.9, "gate_retry": "off", **kw})


def run(setup: tuple[Forecaster, dict[str, torch.Tensor]], train_cfg: TrainConfig, rec: Recurrence | None) -> UpdateResult:
    base, data = setup
    return update(base, **data, lora_cfg=LoraConfigSection(r=4), train_cfg=train_cfg, plan=plan_from_config(train_cfg), seed=0, recurrence=rec)


# Each update runs once for the module: a few seconds of real training in all.
@pytest.fixture(scope="module")
def permanent_fixed(setup) -> UpdateResult:
    return run(setup, cfg(gate_recurrence=False), recurrence(False))


@pytest.fixture(scope="module")
def permanent_weighed(setup) -> UpdateResult:
    return run(setup, cfg(), recurrence(False))


@pytest.fixture(scope="module")
def alternating_retried(setup) -> UpdateResult:
    """The alternating case with the retry on: its first attempt is the gate without a retry."""
    return run(setup, cfg(gate_retry="replay", gate_retry_replay_fraction=0.8), recurrence(True))


def test_the_evidence_tells_a_permanent_change_from_a_recurring_one() -> None:
    permanent, alternating = recurrence(False), recurrence(True)
    assert permanent.returns == 0 and permanent.weight == pytest.approx(0.05)
    assert "old regime not seen since" in permanent.summary and "persists for 2" in permanent.summary
    assert alternating.returns == 1 and alternating.weight == 1.0
    assert "came back 1 time before, after at most 24 h away" in alternating.summary


def test_a_permanent_change_is_accepted_where_the_fixed_rule_rejects(permanent_fixed, permanent_weighed) -> None:
    assert not permanent_fixed.accepted and "forgets the old regime" in permanent_fixed.reason
    weighed = permanent_weighed
    assert weighed.accepted, weighed.reason
    assert "old regime not seen since" in weighed.reason
    assert "accepted although it forgets the old regime by" in weighed.reason
    assert "lower in the median held-out window" in weighed.reason  # judged window by window
    assert weighed.gate is not None and weighed.gate["weight"] == pytest.approx(0.05) and weighed.gate["forgetting"] > 0.9


def test_an_alternating_regime_is_held_to_the_tolerance(alternating_retried) -> None:
    first = alternating_retried.gate["attempts"][0] if alternating_retried.gate else None
    assert first is not None and first["kind"] == "first" and not first["accepted"]
    assert "came back 1 time before" in first["reason"] and "rejected: it forgets the old regime by" in first["reason"]
    assert alternating_retried.gate is not None and alternating_retried.gate["weight"] == 1.0


def test_one_more_attempt_before_a_rejection_for_forgetting(alternating_retried) -> None:
    result = alternating_retried
    assert result.gate is not None
    attempts = result.gate["attempts"]
    assert [a["kind"] for a in attempts] == ["first", "heavier replay"]
    assert attempts[0]["accepted"] is False and attempts[1]["replay_fraction"] == 0.8
    assert result.steps == 30 and result.replay_windows_seen > 0
    # The second attempt forgets less than the first, within the tolerance: accepted.
    assert attempts[1]["replay_val_loss"] < attempts[0]["replay_val_loss"]
    assert result.accepted and attempts[1]["accepted"], result.reason


def test_the_recent_loss_is_judged_in_the_median_window_not_by_a_few_impacts() -> None:
    before = {"recent_val_loss": 1.0, "replay_val_loss": None}
    incumbent = torch.ones(20)
    # Better on 17 of 20 held-out windows, far worse on the 3 that hold an impact: the mean worsens.
    spiked = torch.cat([torch.full((17,), 0.9), torch.full((3,), 3.0)])
    after = {"recent_val_loss": float(spiked.mean()), "replay_val_loss": None}
    assert not judge(before, after, 0.3).accepted  # the means alone reject it
    verdict = judge(before, after, 0.3, recent_windows=(incumbent, spiked))
    assert verdict.accepted and "recent loss 10% lower in the median held-out window" in verdict.reason
    # Worse on 15 of 20 windows, the mean pulled down by 5: rejected, though the mean improves.
    lucky = torch.cat([torch.full((15,), 1.05), torch.full((5,), 0.1)])
    after = {"recent_val_loss": float(lucky.mean()), "replay_val_loss": None}
    assert judge(before, after, 0.3).accepted
    verdict = judge(before, after, 0.3, recent_windows=(incumbent, lucky))
    assert not verdict.accepted and verdict.failed_on == "recent"
    assert "does not improve in the median held-out window (+5%" in verdict.reason
