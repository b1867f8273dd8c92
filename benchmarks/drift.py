"""Input drift benchmark: false alarms on normal operation, delay on a real change, cost per value.

    python benchmarks/drift.py                          # 3 seeds x 30 stationary days, regime changes
    python benchmarks/drift.py --time-scale 1 --seeds 1 --days 3   # real time: 86,400 steps a day
    python benchmarks/drift.py --skip-inputs --residual-seeds 0 --realtime-seeds 2 --month-seeds 1   # 30 days at 1 reading/s

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
with a regime change on day six; the abrupt overload, current +45% in one
step, at 07:12 of day six); the same residuals go through
`[drift] residuals = "stream"` (ADWIN on every residual), `"window"` (the
default: a day's mean |residual| against the first day's) and the window plus
the CUSUM on every |residual| (`cusum = true`).

Residual drift at 1 reading/s (`--realtime-seeds`): the CUSUM works in steps,
and in compressed time a day's cycle passes in 600 of them, so its false
alarms and delay are measured where it runs: a base pretrained on 00:00-04:00
scores 04:00-10:00 (the line starting at 06:00 included), stationary or with
the abrupt overload at 07:00, through the window alone and with the CUSUM.

Residual false alarms over a month at 1 reading/s (`--month-seeds`, off by
default: ~20 min a seed on one core): the CUSUM's target is at most one false
alarm in 30 stationary days, which hours cannot show. The base is trained as
in the real-time table (00:00-04:00 of day 0) and scores the next
`--month-days` (30) days, 86,400 steps a day. Scoring 2.6 M steps through
`Scorer.add_step` would take over an hour, so the model's one-step residuals
are computed in batches, as `report.compute_forecasts` replays a grid (the
first hour is checked against `Scorer.add_step`, and the run stops if they
differ), then fed step by step to a `DriftMonitor` with the window alone (the
default) and one with the CUSUM on. The base stays frozen for the
month: no routine adapter updates, as in the other residual tables.
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
    parser.add_argument("--realtime-seeds", type=int, default=2, help="seeds for the 1 reading/s residual table (0: skip it)")
    parser.add_argument("--month-seeds", type=int, default=0,
                        help="seeds for the 1 reading/s false-alarm table over --month-days stationary days (~20 min a seed; 0: skip it)")
    parser.add_argument("--month-days", type=int, default=30, help="stationary days per seed of the --month-seeds table")
    parser.add_argument("--month-first-seed", type=int, default=0, help="first seed of the --month-seeds table")
    parser.add_argument("--skip-inputs", action="store_true", help="only the residual tables")
    args = parser.parse_args()
    global SCALE, DAY
    SCALE, DAY = args.time_scale, int(86400 / args.time_scale)
    if not args.skip_inputs:
        input_table(args)
    if args.residual_seeds and SCALE == 144:
        residual_table(args.residual_seeds)
    if args.realtime_seeds:
        realtime_table(args.realtime_seeds)
    if args.month_seeds:
        month_table(args.month_seeds, args.month_days, args.month_first_seed)


def input_table(args: argparse.Namespace) -> None:
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


def scored_residuals(seed: int, change_day: float | None, regime: str, ramp_steps: int = 20) -> np.ndarray:
    """(12 days, 3) residuals of a base model pretrained on the three days before them."""
    import torch

    torch.set_num_threads(1)
    n_train, n_test = 3 * DAY, 12 * DAY
    change = None if change_day is None else n_train + int(change_day * DAY)
    data = generate_labeled(
        n_train + n_test, seed=seed, time_scale=SCALE, regime_change_at=change, regime=regime, ramp_steps=ramp_steps  # type: ignore[arg-type]
    )
    return _base_residuals(data, n_train, n_test)


def _base_residuals(data: object, n_train: int, n_test: int) -> np.ndarray:
    """(n_test, 3) model residuals of the `n_test` steps after the first `n_train`, scored by a
    default-size base pretrained (500 steps) on those first steps."""
    import tempfile
    from pathlib import Path

    from edge_daemon.adapters import load_base, serving_model
    from edge_daemon.config import ModelConfig
    from edge_daemon.frames import build_grid
    from edge_daemon.pretrain import pretrain
    from edge_daemon.scoring import Scorer
    from sample_sensors.generate import readings

    with tempfile.TemporaryDirectory() as tmp:
        grid = build_grid(*readings(data, 0, n_train), len(CHANNELS), 1.0, 5)  # type: ignore[arg-type]
        pretrain(grid, list(CHANNELS), 1.0, ModelConfig(), Path(tmp), steps=500)
        base = load_base(Path(tmp), list(CHANNELS), 1.0)
    scorer = Scorer(base, serving_model(base, None), 6.0)
    values = np.stack([data.values[c] for c in CHANNELS], axis=1)  # type: ignore[attr-defined]
    residuals = np.full((n_test, len(CHANNELS)), np.nan)
    for k in range(n_train, n_train + n_test):
        result = scorer.add_step(float(data.ts[k]), values[k])  # type: ignore[attr-defined]
        # The model's own residual, as the pipeline feeds the monitor (not the served forecast's).
        if result is not None and result.model_residual is not None:
            residuals[k - n_train] = result.model_residual
    return residuals


HOUR_RT = 3600  # steps in an hour of real time (1 reading/s)


def realtime_residuals(seed: int, change_h: float | None, train_h: float = 4.0, score_h: float = 6.0) -> np.ndarray:
    """(score_h hours, 3) residuals at 1 reading/s of a base pretrained on the first `train_h` hours of the
    day (the night shift); scoring starts at train_h, so it spans the line starting at 06:00. With
    `change_h`, an abrupt overload (current +45% in one step) at that hour of the day."""
    import torch

    torch.set_num_threads(1)
    n_train, n_test = int(train_h * HOUR_RT), int(score_h * HOUR_RT)
    change = None if change_h is None else int(change_h * HOUR_RT)
    data = generate_labeled(n_train + n_test, seed=seed, regime_change_at=change, regime="overload", ramp_steps=1)
    return _base_residuals(data, n_train, n_test)


RESIDUAL_MODES: dict[str, dict[str, object]] = {
    "stream": {"residuals": "stream"},
    "window (default)": {"residuals": "window", "cusum": False},
    "window + cusum (`cusum = true`)": {"residuals": "window", "cusum": True},
}


def residual_events(residuals: np.ndarray, settings: dict[str, object], period_s: float) -> tuple[list[tuple[int, str]], float]:
    """Residual drift events (step, channel) of a monitor fed `residuals`, and us per update_residuals."""
    cfg = DriftConfig(**settings)  # type: ignore[arg-type]
    mon = DriftMonitor(list(CHANNELS), cfg, period_s=period_s)
    events = []
    start = time.perf_counter()
    for k in range(len(residuals)):
        events += [(k, e.channel) for e in mon.update_residuals(residuals[k], float(k)) if e.kind == "residuals"]
    return events, (time.perf_counter() - start) / len(residuals) * 1e6


def realtime_table(seeds: int) -> None:
    change = 3 * HOUR_RT  # 07:00, three hours into the scored 04:00-10:00
    rows: dict[str, dict[str, list]] = {mode: {"alarms": [], "current": [], "any": [], "us": []} for mode in RESIDUAL_MODES if mode != "stream"}
    hours = 0.0
    for seed in range(seeds):
        stationary = realtime_residuals(seed, None)
        overload = realtime_residuals(seed, 7.0)
        hours += len(stationary) / HOUR_RT + change / HOUR_RT  # the overload run is stationary until 07:00
        for mode, row in rows.items():
            settings = {**RESIDUAL_MODES[mode], "residual_window_s": 86400.0}
            events, us = residual_events(stationary, settings, 1.0)
            after, _ = residual_events(overload, settings, 1.0)
            row["alarms"].append(len(events) + sum(1 for k, _ in after if k < change))
            row["current"].append(next((k - change for k, ch in after if k >= change and ch == "m1/current"), None))
            row["any"].append(next((k - change for k, _ in after if k >= change), None))
            row["us"].append(us)
        print(f"realtime seed {seed}: " + "; ".join(f"{m} {r['alarms'][-1]} alarms, overload {r['current'][-1]}" for m, r in rows.items()), flush=True)
    fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
    print(f"\nResidual drift at 1 reading/s, base pretrained on 00:00-04:00, {seeds} seeds x (6 h stationary + 3 h before the overload) = {hours:g} stationary hours\n")
    print("| residual drift | alarms in stationary hours | alarms per day (extrapolated) | overload (current +45%, 1 step): first alarm on current (steps = s after) | first alarm on any channel | us per update_residuals (3 channels) |")
    print("|---|--:|--:|---|---|--:|")
    for mode, row in rows.items():
        alarms = sum(row["alarms"])
        print(f"| {mode} | {alarms} | {alarms / hours * 24:.2f} | {fmt(row['current'])} | {fmt(row['any'])} | {float(np.median(row['us'])):.1f} |")


DAY_RT = 86400  # steps in a day of real time


def realtime_base(data, n_train: int):  # noqa: ANN001, ANN201 - SensorData -> BaseModel (imports stay lazy)
    """A default-size base pretrained (500 steps) on the first `n_train` steps of `data`, as the real-time table's."""
    import tempfile
    from pathlib import Path

    from edge_daemon.adapters import load_base
    from edge_daemon.config import ModelConfig
    from edge_daemon.frames import build_grid
    from edge_daemon.pretrain import pretrain
    from sample_sensors.generate import readings

    with tempfile.TemporaryDirectory() as tmp:
        grid = build_grid(*readings(data, 0, n_train), len(CHANNELS), 1.0, 5)
        pretrain(grid, list(CHANNELS), 1.0, ModelConfig(), Path(tmp), steps=500)
        return load_base(Path(tmp), list(CHANNELS), 1.0)


def batched_residuals(base, model, ts: np.ndarray, values: np.ndarray, batch: int = 512, progress: str = "") -> np.ndarray:  # noqa: ANN001
    """(N, C) the model's one-step residuals (forecast - actual, normalised units) at every step of
    the contiguous, NaN-free stream `values` (N, C raw, float64) at times `ts`, as `Scorer.add_step`
    gives them (`model_residual`) when fed the same steps in order: NaN for the first `window` steps
    (the scorer's history fills), then at step k the last position of the model run on steps
    k - window .. k - 1, minus step k. Inputs are built as `BaseModel.inputs` builds them (calendar
    columns included when the base has them), from float64 raw values as the scorer gets them."""
    import torch

    from edge_daemon.frames import Grid

    assert np.isfinite(values).all(), "the batched replay assumes a gap-free stream, as the scorer scores one"
    assert np.allclose(np.diff(ts), base.period_s), "the batched replay assumes one step per period"
    window = base.cfg.window
    inputs = base.inputs(Grid(float(ts[0]), base.period_s, values)).values  # (N, n_inputs) float32
    actual = inputs[:, : base.cfg.n_channels]  # the forecast channels lead
    residuals = np.full(actual.shape, np.nan, dtype=np.float32)
    offsets = np.arange(window)
    started, last_report = time.perf_counter(), 0
    model.eval()
    with torch.inference_mode():
        for lo in range(window, len(inputs), batch):
            rows = np.arange(lo, min(lo + batch, len(inputs)))  # the steps forecast
            x = torch.from_numpy(np.ascontiguousarray(inputs[(rows - window)[:, None] + offsets[None, :]]))  # (B, W, n_inputs)
            residuals[rows] = model(x)[:, -1].numpy() - actual[rows]
            if progress and rows[-1] - last_report >= 2 * DAY_RT:
                last_report = rows[-1]
                print(f"{progress}: {rows[-1] / DAY_RT:.0f} days forecast, {time.perf_counter() - started:.0f} s", flush=True)
    return residuals


def scorer_residuals(base, model, ts: np.ndarray, values: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """(N, C) the model residuals `Scorer.add_step` gives for the same steps, one at a time (the reference)."""
    from edge_daemon.scoring import Scorer

    scorer = Scorer(base, model, 6.0)
    residuals = np.full(values.shape, np.nan, dtype=np.float32)
    for k in range(len(values)):
        result = scorer.add_step(float(ts[k]), values[k])
        if result is not None and result.model_residual is not None:
            residuals[k] = result.model_residual
    return residuals


def month_table(seeds: int, days: int, first_seed: int = 0, train_h: float = 4.0, check_steps: int = 3600) -> None:
    """False alarms of the residual judges (the window; the window and the CUSUM) at 1 reading/s over
    `days` stationary days per seed.

    As the real-time table: a default-size base pretrained on 00:00-04:00 of day 0, then it scores
    the next `days` days from 04:00 on. Scoring 2.6 M steps through `Scorer.add_step` takes over an
    hour, so the model's residuals are computed in batches (`batched_residuals`; the first
    `check_steps` are checked against `Scorer.add_step`) and fed step by step to a `DriftMonitor`
    with the window alone and to one with the CUSUM on."""
    import torch

    from edge_daemon.adapters import serving_model
    from edge_daemon.drift.cusum import CUSUM
    from edge_daemon.drift.monitor import CUSUM_CLIP

    torch.set_num_threads(1)
    modes = [mode for mode in RESIDUAL_MODES if mode != "stream"]
    alarms: dict[str, list[list[tuple[int, str]]]] = {mode: [] for mode in modes}
    peaks, us, diffs, calendar = [], {mode: [] for mode in modes}, [], None
    defaults = DriftConfig()
    for seed in range(first_seed, first_seed + seeds):
        started = time.perf_counter()
        n_train, n_test = int(train_h * HOUR_RT), days * DAY_RT
        data = generate_labeled(n_train + n_test, seed=seed)
        base = realtime_base(data, n_train)
        calendar = base.cfg.calendar_s
        model = serving_model(base, None)  # what the scorer serves with no adapter
        ts, values = data.ts[n_train:], np.stack([data.values[c][n_train:] for c in CHANNELS], axis=1)
        del data
        print(f"month seed {seed}: data and base {time.perf_counter() - started:.0f} s (calendar inputs: {list(calendar) or 'none'})", flush=True)
        # The batched replay must give what the daemon's scorer gives, step for step.
        fast = batched_residuals(base, model, ts[:check_steps], values[:check_steps])
        slow = scorer_residuals(base, model, ts[:check_steps], values[:check_steps])
        if not np.array_equal(np.isnan(fast), np.isnan(slow)):
            raise AssertionError("batched and Scorer.add_step residuals are missing on different steps")
        diff = float(np.nanmax(np.abs(fast - slow)))
        diffs.append(diff)
        print(f"month seed {seed}: batched vs Scorer.add_step over {check_steps} steps: max |difference| {diff:.2e} "
              f"(typical |residual| {float(np.nanmean(np.abs(slow))):.3f})", flush=True)  # fmt: skip
        if diff > 1e-5:
            raise AssertionError(f"batched residuals differ from Scorer.add_step by {diff:.2e}")
        residuals = batched_residuals(base, model, ts, values, progress=f"month seed {seed}")
        del values
        for mode in modes:
            events, cost = residual_events(residuals, {**RESIDUAL_MODES[mode], "residual_window_s": 86400.0}, 1.0)
            alarms[mode].append(events)
            us[mode].append(cost)
        # How close the CUSUM came: a detector as the monitor's own (same settings) on each channel's |residual|.
        peak = []
        for c in range(len(CHANNELS)):
            cusum = CUSUM(k=defaults.cusum_k, h=defaults.cusum_h, warmup=defaults.cusum_warmup_steps, clip=CUSUM_CLIP, mode="up")
            top = 0.0
            for r in np.abs(residuals[:, c]).tolist():
                if r == r:  # not NaN
                    cusum.update(r)
                    top = max(top, cusum.statistic)
            peak.append(top)
        peaks.append(peak)
        # How well this base forecasts (bases trained on four hours differ a lot): mean |residual| at night and by day.
        hour = (np.arange(len(residuals)) + n_train) % DAY_RT // HOUR_RT
        night, day = np.nanmean(np.abs(residuals[hour < 6]), axis=0), np.nanmean(np.abs(residuals[(hour >= 7) & (hour < 22)]), axis=0)
        print(f"month seed {seed}: mean |residual| (temp, vib, current) 00-06 h {[round(float(v), 3) for v in night]}, 07-22 h {[round(float(v), 3) for v in day]}", flush=True)
        clock = lambda k: f"day {k // DAY_RT} {k % DAY_RT // 3600:02d}:{k % 3600 // 60:02d}"  # noqa: E731 - k: step of the day-0 stream
        when = lambda events: ", ".join(f"{ch.split('/')[-1]} {clock(k + n_train)}" for k, ch in events) or "none"  # noqa: E731
        print(f"month seed {seed}: " + "; ".join(f"{m} {len(alarms[m][-1])} alarms ({when(alarms[m][-1])})" for m in modes)
              + f"; peak CUSUM {', '.join(f'{p:.1f}' for p in peak)}; {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    total_days = seeds * days
    print(f"\nResidual drift at 1 reading/s over {seeds} seed(s) ({first_seed}..{first_seed + seeds - 1}) x {days} stationary days ({days * DAY_RT:,} steps a seed), "
          f"default-size base pretrained on 00:00-0{train_h:g}:00 of day 0 (calendar inputs: {list(calendar or ()) or 'none'}), "
          f"scoring from 0{train_h:g}:00; residuals batched (max |difference| from Scorer.add_step {max(diffs):.1e})\n")  # fmt: skip
    print(f"| residual drift (default config) | stationary days | false alarms (temp / vib / current) | alarms per 30 days | peak CUSUM statistic per seed (temp, vib, current; h = {defaults.cusum_h:g}) | us per update_residuals (3 channels) |")
    print("|---|--:|--:|--:|---|--:|")
    for mode in modes:
        events = [e for seed_events in alarms[mode] for e in seed_events]
        counts = " / ".join(str(sum(1 for _, ch in events if ch == c)) for c in CHANNELS)
        peak_cell = "; ".join(", ".join(f"{p:.1f}" for p in peak) for peak in peaks) if "cusum" in mode else "-"
        print(f"| {mode} | {total_days} | {len(events)} ({counts}) | {len(events) / total_days * 30:.2f} | {peak_cell} | {float(np.median(us[mode])):.1f} |")


def residual_table(seeds: int) -> None:
    scenarios = (("stationary", None, "bearing_wear", None), ("bearing wear", 6, "bearing_wear", "m1/vibration"),
                 ("recalibration", 6, "current_recalibration", "m1/current"),
                 ("overload", 6.3, "overload", "m1/current"))  # fmt: skip
    results: dict[str, dict[str, list]] = {mode: {name: [] for name, *_ in scenarios} for mode in RESIDUAL_MODES}
    for seed in range(seeds):
        for name, change_day, regime, _ in scenarios:
            residuals = scored_residuals(seed, change_day, regime, ramp_steps=1 if regime == "overload" else 20)
            for mode in RESIDUAL_MODES:
                settings = {**RESIDUAL_MODES[mode], "residual_window_s": DAY * SCALE}
                cfg = DriftConfig(**settings)  # type: ignore[arg-type]
                mon = DriftMonitor(list(CHANNELS), cfg, period_s=SCALE)
                events = []
                for k in range(len(residuals)):
                    events += [(k, e.channel) for e in mon.update_residuals(residuals[k], float(k))]
                results[mode][name].append(events)
            print(f"seed {seed} {name}: " + "; ".join(f"{m} {len(results[m][name][-1])} alarms" for m in results), flush=True)
    print(f"\nResidual drift, default-size base pretrained on 3 days, {seeds} seeds x 12 scored days (1 day = {DAY} steps)\n")
    print("| residual drift | alarms per stationary day | x stream | bearing wear: first alarm on vibration (steps after) | recalibration: first alarm on current (steps after) | overload (abrupt): first alarm on current (steps after) | alarms before the change |")
    print("|---|--:|--:|---|---|---|--:|")
    base = sum(len(e) for e in results["stream"]["stationary"]) / (12 * seeds)
    for mode, by_scenario in results.items():
        per_day = sum(len(e) for e in by_scenario["stationary"]) / (12 * seeds)
        cells, early = [], 0
        for name, change_day, _, channel in scenarios[1:]:
            change = int(change_day * DAY)
            firsts = []
            for events in by_scenario[name]:
                early += sum(1 for k, _ in events if k < change)
                after = [k - change for k, ch in events if ch == channel and k >= change]
                firsts.append(str(after[0]) if after else "missed")
            cells.append(", ".join(firsts))
        print(f"| {mode} | {per_day:.2f} | {per_day / base if base else float('nan'):.3f} | {cells[0]} | {cells[1]} | {cells[2]} | {early} |")


if __name__ == "__main__":
    main()
