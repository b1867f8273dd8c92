"""The gate on permanent and recurring changes of the sample motor (`python benchmarks/adapt.py --cases`).

Per case and seed: three days of the sample motor at 10 s (the old regime, or days alternating
between old and new), then one hour of the new regime (bearing wear; the line retuned for good;
bearing wear on alternate days; a recalibrated current sensor); a base pretrained on the old regime; one
update on that hour with replay from the older days. Three decisions on the same data: always
accept, today's gate (the mean recent loss must improve, the fixed `gate_tolerance`, no retry) and the new gate (the old regime
weighed by its chance of return from the history's bucket signatures, `training.recurrence`, with
one retry before a rejection for forgetting, the recent loss judged in the median window). MAE (normalised units) after each decision on the
next hours of the new regime and on the old regime when it is next seen (the next day for the
alternating case; held-out old data otherwise); a rejected update leaves the base. Beside them,
on the same steps (the last position of the new-regime windows): persistence and the ridge
autoregression refitted on the update's hour, the baselines the daemon serves beside the model.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch
from _common import mae, pretrain

from edge_daemon.baselines import fit_ridge
from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.training.loop import update
from edge_daemon.training.plan import plan_from_config
from edge_daemon.training.recurrence import bucket_signatures, estimate
from sample_sensors.generate import CHANNELS, MotorParams, generate_labeled

PERIOD_S = 10.0
DAY = int(86400 / PERIOD_S)
HOUR = int(3600 / PERIOD_S)
CASES = ("permanent", "retuned", "alternating", "recalibration", "forgetting")
CASE_TITLES = {
    "permanent": "permanent (bearing wear)",
    "retuned": "permanent (the line retuned: temperature +8, another batch frequency, current coupled 3x to load)",
    "alternating": "alternating (daily)",
    "recalibration": "recalibration (current sensor)",
    "forgetting": "alternating, an update made to forget (no replay in its first attempt, 3x the learning rate)",
}
# 'forgetting': the alternating case with an update that forgets the returning regime, so the gate
# rejects its first attempt for forgetting and the two retries (heavier replay, anchored to the
# base) are measured against each other; the other cases forget too little for any retry to run.
FORGETTING = {"replay_fraction": 0.0, "lr": 3 * TrainConfig().lr}
# 'retuned': the motor after a change of process, for good: 8 degrees warmer, the batch cycle (and
# with it the vibration's) at another frequency and deeper, the current three times as dependent on
# the load (its copper losses rescaled so the winding heats about as much as before).
RETUNED = MotorParams(ambient_mean_c=28.0, batch_cycle_s=600.0, batch_depth=0.3, current_full_a=36.0, heating_c_per_a2=0.03)


def motor(case: str, seed: int, noiseless: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts, values (N, 3), is_new (N,)) for three days, the change's hour and a day after it;
    `noiseless`: the same motor without its measurement noise and spikes (the same random draws
    otherwise, so the same load, wander and weather)."""
    n = 4 * DAY + HOUR
    quiet = {"noise": {c: 0.0 for c in CHANNELS}, "spike_rate": 0.0} if noiseless else {}
    default, retuned = dataclasses.replace(MotorParams(), **quiet), dataclasses.replace(RETUNED, **quiet)
    if case in ("alternating", "forgetting"):
        old = generate_labeled(n, PERIOD_S, seed=seed, params=default)
        new = generate_labeled(n, PERIOD_S, seed=seed, regime_change_at=0, ramp_steps=1, params=default)
        is_new = (np.arange(n) // DAY) % 2 == 1  # day 1 and day 3 (the change's) are new
        is_new[3 * DAY + 2 * HOUR :] = False  # ... and day 3 gives way to the old regime again after 2 h
        is_new[3 * DAY : 3 * DAY + 2 * HOUR] = True
        values = np.where(is_new[:, None], np.stack([new.values[c] for c in CHANNELS], 1), np.stack([old.values[c] for c in CHANNELS], 1))
        return old.ts, values, is_new
    if case == "retuned":
        old = generate_labeled(n, PERIOD_S, seed=seed, params=default)
        new = generate_labeled(n, PERIOD_S, seed=seed, params=retuned)
        is_new = np.arange(n) >= 3 * DAY
        values = np.where(is_new[:, None], np.stack([new.values[c] for c in CHANNELS], 1), np.stack([old.values[c] for c in CHANNELS], 1))
        return old.ts, values, is_new
    regime = "bearing_wear" if case == "permanent" else "current_recalibration"
    data = generate_labeled(n, PERIOD_S, seed=seed, regime_change_at=3 * DAY, regime=regime, ramp_steps=6, params=default)
    is_new = np.arange(n) >= 3 * DAY
    return data.ts, np.stack([data.values[c] for c in CHANNELS], 1), is_new


def cut(x: torch.Tensor, idx: np.ndarray, length: int, stride: int) -> torch.Tensor:
    starts = [int(i) for i in idx[::stride] if i + length <= len(x)]
    return torch.stack([x[i : i + length] for i in starts]) if starts else torch.empty(0, length, x.shape[1])


def channel_mae(model: torch.nn.Module, data: torch.Tensor) -> list[float]:
    """Mean absolute next-step error per channel (normalised units) over (N, T+1, C) windows."""
    model.eval()
    with torch.inference_mode():
        errors = torch.cat([(model(chunk[:, :-1]) - chunk[:, 1:]).abs().mean(1) for chunk in data.split(64)])
    return [float(e) for e in errors.mean(0)]


def last_position_mae(model: torch.nn.Module | None, data: torch.Tensor, ridge: Any = None) -> float:
    """Mean absolute next-step error at the last position of (N, T+1, C) windows, over channels:
    of `model`, of a fitted RidgeAR (`ridge`), or of persistence (neither)."""
    x = data.numpy().astype(np.float64)
    if ridge is not None:
        forecast = np.stack([ridge.predict(w[:-1]) for w in x])
    elif model is not None:
        model.eval()
        with torch.inference_mode():
            forecast = torch.cat([model(chunk[:, :-1])[:, -1] for chunk in data.split(64)]).numpy()
    else:
        forecast = x[:, -2]
    return float(np.abs(forecast - x[:, -1]).mean())


def run_case(case: str, seed: int, args: Any) -> dict[str, Any]:
    ts, values, is_new = motor(case, seed)
    change = 3 * DAY
    now = change + HOUR  # the update runs one hour into the new regime
    mean, std = values[:change][~is_new[:change]].mean(0), values[:change][~is_new[:change]].std(0) + 1e-6
    x = torch.from_numpy(((values - mean) / std).astype(np.float32))
    length = args.window + 1
    old_rows = np.flatnonzero(~is_new[:change])
    torch.manual_seed(seed)
    base = Forecaster(ForecasterConfig(n_channels=3, window=args.window, d_model=32, n_layers=2, d_ff=64))
    pretrain(base, cut(x, old_rows[old_rows < change - DAY // 2], length, 5), args.pretrain_steps, seed=seed)
    recent = cut(x, np.arange(change, now - length), length, 1)
    n_val = max(1, len(recent) // 5)
    rng = np.random.default_rng(seed)
    history = np.arange(0, change - length)
    replay = cut(x, np.sort(rng.choice(history, size=min(len(history), 400), replace=False)), length, 1)
    perm = torch.from_numpy(rng.permutation(len(replay)))
    replay = replay[perm]
    n_rval = len(replay) // 5
    data = {"recent_train": recent[:-n_val], "recent_val": recent[-n_val:], "replay_train": replay[n_rval:], "replay_val": replay[:n_rval]}
    # Held out: the next hours of the new regime, and the old regime when next seen.
    new_later = np.flatnonzero(is_new[now:]) + now
    old_next = np.flatnonzero(~is_new[now:]) + now if case in ("alternating", "forgetting") else old_rows[old_rows >= change - DAY // 2]
    new_eval = cut(x, new_later[: 3 * HOUR], length, 7)
    old_eval = cut(x, old_next[: 6 * HOUR], length, 7)
    starts, counts, stats = bucket_signatures(ts[:now], values[:now])
    cfg = TrainConfig(steps=args.steps, **(FORGETTING if case == "forgetting" else {}))
    recurrence = estimate(starts, counts, stats, list(CHANNELS), float(ts[change]), float(ts[now - 1]), min_weight=cfg.gate_min_weight, settle_hours=cfg.gate_settle_hours)
    lora_cfg = LoraConfigSection()
    out: dict[str, Any] = {"case": case, "seed": seed, "weight": recurrence.weight, "evidence": recurrence.summary}
    started = time.monotonic()
    fixed_cfg = cfg.model_copy(update={"gate_recurrence": False, "gate_retry": "off", "gate_recent_statistic": "mean"})
    fixed = update(base, **data, lora_cfg=lora_cfg, train_cfg=fixed_cfg, plan=plan_from_config(fixed_cfg), seed=seed, keep_rejected=True)
    out["base"] = (mae(base, new_eval), mae(base, old_eval))
    out["base_by_channel"] = channel_mae(base, new_eval)
    out["always"] = (mae(fixed.adapted, new_eval), mae(fixed.adapted, old_eval), True)
    out["today"] = out["always"] if fixed.accepted else (*out["base"], False)
    out["today_reason"] = fixed.reason
    for retry in ("replay", "anchor"):
        new_cfg = cfg.model_copy(update={"gate_retry": retry})
        gated = update(base, **data, lora_cfg=lora_cfg, train_cfg=new_cfg, plan=plan_from_config(new_cfg), seed=seed, keep_rejected=True, recurrence=recurrence)
        after = (mae(gated.adapted, new_eval), mae(gated.adapted, old_eval), True) if gated.accepted else (*out["base"], False)
        out[f"new_{retry}"] = after
        out[f"new_{retry}_by_channel"] = channel_mae(gated.adapted, new_eval) if gated.accepted else out["base_by_channel"]
        out[f"new_{retry}_retried"] = len(gated.gate["attempts"]) > 1 if gated.gate else False
        out[f"new_{retry}_reason"] = gated.reason
        if retry == "replay":
            served = gated.adapted if gated.accepted else base  # what the default gate leaves serving
    # The ceiling: the base fully fine-tuned on many hours of the new regime after the evaluated
    # ones (what any update of this model could reach; the new regime's noise is the rest).
    later = new_later[3 * HOUR :]
    if len(later) >= 2 * HOUR:
        ceiling = copy.deepcopy(base)
        pretrain(ceiling, cut(x, later[: 20 * HOUR], length, 3), 400, seed=seed)
        out["ceiling"] = (mae(ceiling, new_eval), mae(ceiling, old_eval), True)
        out["ceiling_by_channel"] = channel_mae(ceiling, new_eval)
    # The floor: the generator's own signal without its noise and spikes, as a forecast of the
    # same steps. It knows every step's load and wander too: what separates it from the readings
    # is noise (and spikes) that no forecast removes, a bound on what any forecaster can reach.
    _, clean, _ = motor(case, seed, noiseless=True)
    gap = (x - torch.from_numpy(((clean - mean) / std).astype(np.float32))).abs()
    out["floor"] = (float(cut(gap, new_later[: 3 * HOUR], length, 7)[:, 1:].mean()), float(cut(gap, old_next[: 6 * HOUR], length, 7)[:, 1:].mean()), True)
    # The baselines the daemon serves beside the model, on the same steps (the last position of
    # the new-regime windows): persistence, and the ridge autoregression refitted on the same hour
    # the update learns from (as an update refits it).
    ridge = fit_ridge(torch.cat([data["recent_train"], data["recent_val"]]).numpy(), lags=8)
    out["last"] = {
        "persistence": last_position_mae(None, new_eval),
        "ridge (the update's hour)": last_position_mae(None, new_eval, ridge) if ridge is not None else float("nan"),
        "frozen base": last_position_mae(base, new_eval),
        "new gate": last_position_mae(served, new_eval),
    }
    out["seconds"] = time.monotonic() - started
    return out


def report(runs: list[dict[str, Any]]) -> None:
    policies = [("always accept", "always"), ("today's gate", "today"), ("new gate (retry: heavier replay)", "new_replay"), ("new gate (retry: anchor to base)", "new_anchor")]
    for case in CASES:
        rows = [r for r in runs if r["case"] == case]
        if not rows:
            continue
        print(f"\n### {CASE_TITLES[case]}\n")
        for r in rows:
            print(f"- seed {r['seed']}: weight {r['weight']:.2f}; {r['evidence']}")
            print(f"  - today's gate: {r['today_reason']}")
            print(f"  - new gate: {r['new_replay_reason']}" + (" (after a retry)" if r["new_replay_retried"] else ""))
            if r["new_anchor_retried"]:
                print(f"  - new gate, anchored retry: {r['new_anchor_reason']}")
        base_new = statistics.fmean(r["base"][0] for r in rows)
        base_old = statistics.fmean(r["base"][1] for r in rows)
        print(f"\nfrozen base: new-regime MAE {base_new:.4f}, old-regime MAE {base_old:.4f}\n")
        print("| decision | accepted | new-regime MAE | vs base | old-regime MAE | forgetting (vs base) | retries |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, key in policies:
            acc = sum(r[key][2] for r in rows)
            new = statistics.fmean(r[key][0] for r in rows)
            old = statistics.fmean(r[key][1] for r in rows)
            retries = sum(r.get(f"{key}_retried", False) for r in rows)
            print(f"| {label} | {acc}/{len(rows)} | {new:.4f} | {new / base_new - 1:+.1%} | {old:.4f} | {old / base_old - 1:+.1%} | {retries if key.startswith('new') else '-'} |")
        ceiling = [r["ceiling"] for r in rows if "ceiling" in r]
        if len(ceiling) == len(rows):
            new = statistics.fmean(c[0] for c in ceiling)
            old = statistics.fmean(c[1] for c in ceiling)
            print(f"| ceiling: base fully fine-tuned on 20 h of the new regime (not a decision) | - | {new:.4f} | {new / base_new - 1:+.1%} | {old:.4f} | {old / base_old - 1:+.1%} | - |")
        floor = [r["floor"] for r in rows]
        new = statistics.fmean(f[0] for f in floor)
        print(f"| floor: the motor's own signal without its noise and spikes, as a forecast (it knows every step's load and wander) | - | {new:.4f} | {new / base_new - 1:+.1%} | - | - | - |")
        by_channel = [("frozen base", "base_by_channel"), ("new gate (heavier replay)", "new_replay_by_channel"), ("ceiling", "ceiling_by_channel")]
        print("\nnew-regime MAE by channel (" + ", ".join(CHANNELS) + "):", "; ".join(
            f"{label} " + " / ".join(f"{statistics.fmean(r[key][c] for r in rows):.4f}" for c in range(len(CHANNELS)))
            for label, key in by_channel if all(key in r for r in rows)
        ))  # fmt: skip
        labels = list(rows[0]["last"])
        print("\nlast position of the new-regime windows, the same steps for all (MAE, normalised): " + "; ".join(
            f"{label} {statistics.fmean(r['last'][label] for r in rows):.4f}" for label in labels
        ))  # fmt: skip
        print(f"\n(seconds per seed, all decisions: {statistics.fmean(r['seconds'] for r in rows):.0f})")


def main(args: Any) -> None:
    torch.set_num_threads(1)
    runs = [run_case(case, seed, args) for case in args.cases for seed in range(args.seeds)]
    print(f"sample motor at {PERIOD_S:g} s, window {args.window}, model d_model 32 x 2 layers, update {args.steps} steps, {args.pretrain_steps} pretrain steps, {args.seeds} seeds")
    report(runs)
