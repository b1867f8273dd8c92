"""Input drift benchmark: false alarms on normal operation, delay on a real change, cost per value.

    python benchmarks/drift.py                          # 3 seeds x 30 stationary days, regime changes
    python benchmarks/drift.py --time-scale 1 --seeds 1 --days 3   # real time: 86,400 steps a day

The sample motor (sample_sensors) runs its daily cycle, batch cycle and
weather; by default one simulated day is 600 steps (time_scale 144), so whole
days run fast; `--time-scale 1` runs the motor at 1 reading/s in real time. Both ways of judging input drift see the same data:

- stream: `[drift] inputs = "stream"`, the configured detector (ADWIN) on
  every standardised value and on its step-to-step change, the way river's
  detectors are usually run;
- reference: `[drift] inputs = "reference"` (the default), PSI of a one-day
  rolling window against the deciles of two days of training data.

Printed: alarms per stationary day (the baseline is the stream row), the delay
from a regime change to the first alarm on the channel it changes, and the
cost of one update_inputs call for the three channels.

Residual drift (`--residual-seeds`, compressed time only): a default-size base
model is pretrained on three days, then scores twelve more (stationary, or
with a regime change on day six); the same residuals go through
`[drift] residuals = "stream"` (ADWIN on every residual) and `"window"` (the
default: a day's mean |residual| against the first day's).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_daemon.config import DriftConfig
from edge_daemon.drift import DriftMonitor
from edge_daemon.drift.reference import Reference
from sample_sensors.generate import CHANNELS, generate_labeled

SCALE = 144  # set from --time-scale in main()
DAY = int(86400 / SCALE)
REFERENCE_DAYS = 2
CHANGES = (("bearing_wear", "m1/vibration"), ("current_recalibration", "m1/current"))


def motor(days: int, seed: int, change_at: int | None = None, regime: str = "bearing_wear") -> np.ndarray:
    data = generate_labeled(days * DAY, seed=seed, time_scale=SCALE, regime_change_at=change_at, regime=regime)  # type: ignore[arg-type]
    return np.stack([data.values[c] for c in CHANNELS], axis=1)


def monitor(mode: str, values: np.ndarray) -> DriftMonitor:
    if mode == "stream":
        return DriftMonitor(list(CHANNELS), DriftConfig(inputs="stream"))
    references = [Reference.from_values(values[: REFERENCE_DAYS * DAY, c]) for c in range(len(CHANNELS))]
    return DriftMonitor(list(CHANNELS), DriftConfig(input_window_s=DAY * SCALE), input_reference=references, period_s=SCALE)


def run(mon: DriftMonitor, values: np.ndarray) -> tuple[list[tuple[int, str]], float]:
    events: list[tuple[int, str]] = []
    start = time.perf_counter()
    for k in range(REFERENCE_DAYS * DAY, len(values)):
        events += [(k, e.channel) for e in mon.update_inputs(values[k], float(k))]
    per_call_us = (time.perf_counter() - start) / (len(values) - REFERENCE_DAYS * DAY) * 1e6
    return events, per_call_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--days", type=int, default=30, help="stationary days per seed after the reference days")
    parser.add_argument("--time-scale", type=float, default=144.0, help="simulated seconds per step (1: real time)")
    parser.add_argument("--residual-seeds", type=int, default=3, help="seeds for the residual table (0: skip it)")
    args = parser.parse_args()
    global SCALE, DAY
    SCALE, DAY = args.time_scale, int(86400 / args.time_scale)
    rows = {}
    for mode in ("stream", "reference"):
        alarms, days, costs, by_channel = 0, 0, [], dict.fromkeys(CHANNELS, 0)
        delays: dict[str, list[int | None]] = {regime: [] for regime, _ in CHANGES}
        for seed in range(args.seeds):
            values = motor(REFERENCE_DAYS + args.days, seed)
            events, cost = run(monitor(mode, values), values)
            alarms += len(events)
            days += args.days
            costs.append(cost)
            for _, channel in events:
                by_channel[channel] += 1
            change = (REFERENCE_DAYS + 4) * DAY
            for regime, channel in CHANGES:
                values = motor(REFERENCE_DAYS + 8, seed, change, regime)
                events, _ = run(monitor(mode, values), values)
                after = [k - change for k, name in events if name == channel and k >= change]
                delays[regime].append(after[0] if after else None)
        rows[mode] = {"per_day": alarms / days, "by_channel": by_channel, "us": float(np.median(costs)), "delays": delays}
        print(f"{mode}: {alarms} alarms in {days} stationary days {by_channel}; delays {delays}", flush=True)

    base = rows["stream"]["per_day"]
    print(f"\nSample motor, time_scale {SCALE:g}, {args.seeds} seeds x {args.days} stationary days (reference: {REFERENCE_DAYS} days; window: 1 day = {DAY} steps)\n")
    print("| input drift | alarms per stationary day | x stream | by channel (temp / vib / current) | delay bearing wear -> vibration (steps) | delay recalibration -> current (steps) | us per update_inputs (3 channels) |")
    print("|---|--:|--:|---|---|---|--:|")
    for mode, row in rows.items():
        ratio = row["per_day"] / base if base else float("nan")
        counts = " / ".join(str(row["by_channel"][c]) for c in CHANNELS)
        fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
        print(
            f"| {mode} | {row['per_day']:.2f} | {ratio:.4f} | {counts} | {fmt(row['delays']['bearing_wear'])} "
            f"| {fmt(row['delays']['current_recalibration'])} | {row['us']:.1f} |"
        )
    if args.residual_seeds and SCALE == 144:
        residual_table(args.residual_seeds)


def scored_residuals(seed: int, change_day: int | None, regime: str) -> np.ndarray:
    """(12 days, 3) residuals of a base model pretrained on the three days before them."""
    import tempfile
    from pathlib import Path

    import torch

    from edge_daemon.adapters import load_base, serving_model
    from edge_daemon.config import ModelConfig
    from edge_daemon.frames import build_grid
    from edge_daemon.pretrain import pretrain
    from edge_daemon.scoring import Scorer
    from sample_sensors.generate import readings

    torch.set_num_threads(1)
    n_train, n_test = 3 * DAY, 12 * DAY
    change = None if change_day is None else n_train + change_day * DAY
    data = generate_labeled(n_train + n_test, seed=seed, time_scale=SCALE, regime_change_at=change, regime=regime)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        grid = build_grid(*readings(data, 0, n_train), len(CHANNELS), 1.0, 5)
        pretrain(grid, list(CHANNELS), 1.0, ModelConfig(), Path(tmp), steps=500)
        base = load_base(Path(tmp), list(CHANNELS), 1.0)
    scorer = Scorer(base, serving_model(base, None), 6.0)
    values = np.stack([data.values[c] for c in CHANNELS], axis=1)
    residuals = np.full((n_test, len(CHANNELS)), np.nan)
    for k in range(n_train, n_train + n_test):
        result = scorer.add_step(float(data.ts[k]), values[k])
        if result is not None and result.residual is not None:
            residuals[k - n_train] = result.residual
    return residuals


def residual_table(seeds: int) -> None:
    scenarios = (("stationary", None, "bearing_wear", None), ("bearing wear", 6, "bearing_wear", "m1/vibration"),
                 ("recalibration", 6, "current_recalibration", "m1/current"))  # fmt: skip
    results: dict[str, dict[str, list]] = {mode: {name: [] for name, *_ in scenarios} for mode in ("stream", "window")}
    for seed in range(seeds):
        for name, change_day, regime, _ in scenarios:
            residuals = scored_residuals(seed, change_day, regime)
            for mode in ("stream", "window"):
                cfg = DriftConfig(residuals=mode, residual_window_s=DAY * SCALE)
                mon = DriftMonitor(list(CHANNELS), cfg, period_s=SCALE)
                events = []
                for k in range(len(residuals)):
                    events += [(k, e.channel) for e in mon.update_residuals(residuals[k], float(k))]
                results[mode][name].append(events)
            print(f"seed {seed} {name}: " + "; ".join(f"{m} {len(results[m][name][-1])} alarms" for m in results), flush=True)
    print(f"\nResidual drift, default-size base pretrained on 3 days, {seeds} seeds x 12 scored days (1 day = {DAY} steps)\n")
    print("| residual drift | alarms per stationary day | x stream | bearing wear: first alarm on vibration (steps after) | recalibration: first alarm on current (steps after) | alarms before the change |")
    print("|---|--:|--:|---|---|--:|")
    base = sum(len(e) for e in results["stream"]["stationary"]) / (12 * seeds)
    for mode, by_scenario in results.items():
        per_day = sum(len(e) for e in by_scenario["stationary"]) / (12 * seeds)
        cells, early = [], 0
        for name, change_day, _, channel in scenarios[1:]:
            change = change_day * DAY
            firsts = []
            for events in by_scenario[name]:
                early += sum(1 for k, _ in events if k < change)
                after = [k - change for k, ch in events if ch == channel and k >= change]
                firsts.append(str(after[0]) if after else "missed")
            cells.append(", ".join(firsts))
        print(f"| {mode} | {per_day:.2f} | {per_day / base if base else float('nan'):.3f} | {cells[0]} | {cells[1]} | {early} |")


if __name__ == "__main__":
    main()
