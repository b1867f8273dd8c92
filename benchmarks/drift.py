"""Input drift benchmark: false alarms on normal operation, delay on a real change, cost per value.

    python benchmarks/drift.py                          # 3 seeds x 30 stationary days, regime changes
    python benchmarks/drift.py --time-scale 1 --seeds 1 --days 3   # real time: 86,400 steps a day
    python benchmarks/drift.py --skip-inputs --residual-seeds 0 --realtime-seeds 2 --month-seeds 1   # 30 days at 1 reading/s
    python benchmarks/drift.py --skip-inputs --residual-seeds 0 --realtime-seeds 0 --first-day-seeds 3   # the first day after start-up
    python benchmarks/drift.py --skip-inputs --residual-seeds 0 --realtime-seeds 0 --level-seeds 5   # level judges: a month, the overload

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
`[drift] residuals = "stream"` (ADWIN on every residual), `"window"` alone
(a day's mean |residual| against the first day's; `cusum = false`) and the
window plus the CUSUM (the default; in compressed time its half-minute means
are single steps and its time of day 600 steps long).

Residual drift at 1 reading/s (`--realtime-seeds`): the CUSUM works in
seconds and judges by the time of day, and in compressed time a day passes in
600 steps, so its false alarms and delay are measured where it runs: a base
pretrained on 00:00-04:00 of day 0 scores from 04:00 on (the line starts at
06:00 every day), stationary until the abrupt overload at 07:00 of day 2 (the
CUSUM has learnt a day of residuals by then), then three hours of it, through
the window alone and with the CUSUM; residuals batched as in the month table.

Residual false alarms over a month at 1 reading/s (`--month-seeds`, off by
default: ~20 min a seed on one core): the CUSUM's target is at most one false
alarm in 30 stationary days, which hours cannot show. The base is trained as
in the real-time table (00:00-04:00 of day 0) and scores the next
`--month-days` (30) days, 86,400 steps a day. Scoring 2.6 M steps through
`Scorer.add_step` would take over an hour, so the model's one-step residuals
are computed in batches, as `scoring.replay.compute_forecasts` replays a grid (the
first hour is checked against `Scorer.add_step`, and the run stops if they
differ), then fed step by step to a `DriftMonitor` with the window alone and
one with the CUSUM on (the default). `--month-reuse` feeds residuals saved by
an earlier run instead, to try drift settings. The base stays frozen for the
month: no routine adapter updates, as in the other residual tables. Its last
row starts the default judges from the base's validation residuals, as the
daemon does with a base that recorded them (the base trained on 00:00-04:00
covers those hours only; the other rows learn from the stream alone).

The first day after start-up at 1 reading/s (`--first-day-seeds`, ~3 min a
seed on one idle core): a base pretrained on day 0 (00:00-24:00), the default
judges started from its held-out validation residuals against the same
judges learning for a day (what a base without them gets), on a stationary
first day and on a first day with the overload at 07:00.

The level judges (`--level-seeds`, ~1 min a seed): `[drift] level_channels` on vibration and
current, fed the values as the daemon feeds them, started from the store's newest day; false
alarms over `--month-days` stationary days and the overload's delay in three cases (see
`level_table`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_daemon.config import DriftConfig
from edge_daemon.drift import DriftMonitor
from edge_daemon.drift.reference import Reference
from sample_sensors.generate import CHANNELS, DEFAULT_START_TS, generate_labeled

DATA_DIR = Path(__file__).resolve().parent / ".data"  # not in git: month residuals saved for --month-reuse
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
    parser.add_argument("--month-reuse", action="store_true",
                        help="reuse the month's residuals saved by an earlier run of the same code (benchmarks/.data); "
                             "for trying drift settings, not for published figures")
    parser.add_argument("--first-day-seeds", type=int, default=0,
                        help="seeds for the first-day table at 1 reading/s: judges from the base's validation residuals "
                             "against learning for a day (~3 min a seed; 0: skip it)")
    parser.add_argument("--first-day-first-seed", type=int, default=0, help="first seed of the --first-day-seeds table")
    parser.add_argument("--after-adapter-seeds", type=int, default=0,
                        help="seeds for the table of the first hour after an accepted adapter at 1 reading/s (~5 min a seed; 0: skip it)")
    parser.add_argument("--level-seeds", type=int, default=0,
                        help="seeds for the level-judge tables at 1 reading/s (a stationary month and three overload cases; ~4 min a seed)")
    parser.add_argument("--level-first-seed", type=int, default=0, help="first seed of the --level-seeds tables")
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
    if args.first_day_seeds:
        first_day_table(args.first_day_seeds, first_seed=args.first_day_first_seed)
    if args.after_adapter_seeds:
        after_adapter_table(args.after_adapter_seeds, first_seed=args.first_day_first_seed)
    if args.level_seeds:
        level_table(args.level_seeds, args.month_days, args.level_first_seed)
    if args.month_seeds:
        month_table(args.month_seeds, args.month_days, args.month_first_seed, reuse=args.month_reuse)


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
    """(n_test, 3) model residuals of the `n_test` steps after the first `n_train`, scored through
    `Scorer.add_step` by a default-size base pretrained (500 steps) on those first steps."""
    from edge_daemon.artifacts.merge import serving_model

    base = pretrained_base(data, n_train)
    values = np.stack([data.values[c] for c in CHANNELS], axis=1)  # type: ignore[attr-defined]
    ts = data.ts  # type: ignore[attr-defined]
    return scorer_residuals(base, serving_model(base, None), ts[n_train : n_train + n_test], values[n_train : n_train + n_test])


HOUR_RT = 3600  # steps in an hour of real time (1 reading/s)


def realtime_config(root: Path):  # noqa: ANN201 - Config (imports stay lazy)
    """The daemon's default config, rooted in `root`, for the sample motor at 1 reading/s."""
    from edge_daemon.config import parse_config

    return parse_config({
        "device": {"id": "bench", "state_dir": str(root / "state"), "socket": str(root / "control.sock")},
        "mqtt": {"host": "127.0.0.1"},
        "channels": {"names": list(CHANNELS), "period_s": 1.0},
    })  # fmt: skip


def realtime_residuals(seed: int, change_h: float, base_dir: Path, train_h: float = 4.0):  # noqa: ANN201
    """Residuals at 1 reading/s of a base pretrained (into `base_dir`) on the first `train_h` hours of
    day 0 (the night shift), from then until three hours after an abrupt overload (current +45% in one
    step) at `change_h` hours after day 0's midnight; the time of the first residual; and the data."""
    import torch

    from edge_daemon.artifacts.merge import serving_model

    torch.set_num_threads(1)
    n_train, change = int(train_h * HOUR_RT), int(change_h * HOUR_RT)
    data = generate_labeled(change + 3 * HOUR_RT, seed=seed, regime_change_at=change, regime="overload", ramp_steps=1)
    base = pretrained_base(data, n_train, base_dir)
    values = np.stack([data.values[c][n_train:] for c in CHANNELS], axis=1)
    return batched_residuals(base, serving_model(base, None), data.ts[n_train:], values), float(data.ts[n_train]), data


def first_adapter(config, data, since: float, ready: float) -> tuple[bool, float, str]:  # noqa: ANN001
    """The update the daemon starts after residual drift: readings up to `ready` in the replay store,
    recent data from `since` (the CUSUM's onset), through the daemon's update path. Whether the gate
    accepted it, its wall time (s) and the gate's reason."""
    from _common import run_update

    from edge_daemon.store import Reading, ReplayStore

    keep = data.ts <= ready
    with ReplayStore(config.store_path, config.store, list(CHANNELS)) as store:
        for c in CHANNELS:
            values = data.values[c][keep]
            for lo in range(0, len(values), 100_000):
                store.write([Reading(c, float(t), float(v)) for t, v in zip(data.ts[keep][lo : lo + 100_000], values[lo : lo + 100_000], strict=True)])
    started = time.perf_counter()
    reply = run_update(config, reason="drift detected", since=since)
    return reply.accepted, time.perf_counter() - started, str(reply.reason or "")


RESIDUAL_MODES: dict[str, dict[str, object]] = {
    "stream": {"residuals": "stream"},
    "window alone (`cusum = false`)": {"residuals": "window", "cusum": False},
    "window + CUSUM by time of day (default)": {"residuals": "window", "cusum": True},
    # The CUSUM as first built, for comparison: on every |residual|, judged by its own last hour.
    "window + CUSUM by its last hour (per step, k 0.5, h 100)": {
        "residuals": "window", "cusum": True, "cusum_by_time_of_day": False, "cusum_block_s": 1.0, "cusum_k": 0.5, "cusum_h": 100.0,
    },
}
DEFAULT_MODE = "window + CUSUM by time of day (default)"
# The month table's extra row: the default judges started from the base's validation residuals, as
# the daemon starts them from a base that recorded them (the other rows learn from the stream).
PRIOR_MODE = "window + CUSUM by time of day, from the base's validation residuals (default)"


def residual_events(
    residuals: np.ndarray, settings: dict[str, object], period_s: float, t0: float = 0.0, peaks: list | None = None,
    prior: list | None = None,
) -> tuple[list[tuple[int, str]], float]:
    """Residual drift events (step, channel) of a monitor fed `residuals` (step k at time t0 + k * period_s),
    and us per update_residuals. With `peaks`, the highest sum each channel's CUSUM reached is appended
    to it (read every 10 steps: a CUSUM moves once per half-minute mean; not timed)."""
    events, _, per_call_us = residual_monitor(residuals, settings, period_s, t0, peaks, prior)
    return events, per_call_us


def residual_monitor(
    residuals: np.ndarray, settings: dict[str, object], period_s: float, t0: float = 0.0, peaks: list | None = None,
    prior: list | None = None,
) -> tuple[list[tuple[int, str]], DriftMonitor, float]:
    """`residual_events`, and the monitor after the last residual (started from `prior`, the base's
    validation residuals, when given)."""
    cfg = DriftConfig(**settings)  # type: ignore[arg-type]
    mon = DriftMonitor(list(CHANNELS), cfg, period_s=period_s, residual_prior=prior)
    events = []
    top = [0.0] * len(CHANNELS)
    elapsed = 0.0
    for k in range(len(residuals)):
        start = time.perf_counter()
        events += [(k, e.channel) for e in mon.update_residuals(residuals[k], t0 + k * period_s)]
        elapsed += time.perf_counter() - start
        if peaks is not None and k % 10 == 0:
            top = [max(a, b or 0.0) for a, b in zip(top, mon.residual_cusum_statistics(), strict=True)]
    if peaks is not None:
        peaks.append(top)
    return events, mon, elapsed / len(residuals) * 1e6


def realtime_table(seeds: int, change_h: float = 55.0) -> None:
    """Residual false alarms and the delay to the overload at 1 reading/s: stationary from 04:00 of
    day 0 to the overload at 07:00 of day 2 (the CUSUM judges by the time of day once it has seen
    one), then three hours of it. With the default judges, the update the daemon then starts: once
    the data since the change as the CUSUM dates it spans ten windows, through the update path."""
    import tempfile

    from edge_daemon.adaptation.owner import UPDATE_MIN_WINDOWS_SINCE_CHANGE

    modes = [mode for mode in RESIDUAL_MODES if mode != "stream"]
    rows: dict[str, dict[str, list]] = {mode: {"alarms": [], "current": [], "any": [], "us": []} for mode in modes}
    adapters: list[str] = []
    hours = 0.0
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as root:
            config = realtime_config(Path(root))
            residuals, t0, data = realtime_residuals(seed, change_h, config.base_dir)
            change = int(round(DEFAULT_START_TS + change_h * HOUR_RT - t0))  # steps into the residuals
            hours += change / HOUR_RT
            monitors = {}
            for mode in modes:
                row = rows[mode]
                settings = {**RESIDUAL_MODES[mode], "residual_window_s": 86400.0}
                events, monitors[mode], us = residual_monitor(residuals, settings, 1.0, t0)
                row["alarms"].append(sum(1 for k, _ in events if k < change))
                row["current"].append(next((k - change for k, ch in events if k >= change and ch == "m1/current"), None))
                row["any"].append(next((k - change for k, _ in events if k >= change), None))
                row["us"].append(us)
            # The daemon's update after the first detection (default judges): it waits for ten
            # windows of data since the change the CUSUM dates, then learns from there.
            detected, since = rows[DEFAULT_MODE]["any"][-1], monitors[DEFAULT_MODE].residual_change_from
            if detected is None or since is None:
                adapters.append("no drift, no update")
            else:
                change_t = t0 + change
                ready = max(change_t + detected, since + UPDATE_MIN_WINDOWS_SINCE_CHANGE * (config.model.window + 1))
                accepted, wall, reason = first_adapter(config, data, since, ready)
                total = ready - change_t + wall
                adapters.append(f"{'accepted' if accepted else 'rejected'} {total / 60:.1f} min after the change "
                                f"(data from {since - change_t:+.0f} s; update {wall:.0f} s)")  # fmt: skip
                print(f"realtime seed {seed}: update {'accepted' if accepted else 'rejected'} ({reason}), {total:.0f} s after the change", flush=True)
        print(f"realtime seed {seed}: " + "; ".join(f"{m} {r['alarms'][-1]} alarms, overload {r['any'][-1]}" for m, r in rows.items()), flush=True)
    fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
    print(f"\nResidual drift at 1 reading/s, base pretrained on 00:00-04:00 of day 0, {seeds} seeds x 51 stationary hours "
          f"(04:00 of day 0 to 07:00 of day 2) = {hours:g} hours, then the overload\n")  # fmt: skip
    print("| residual drift | alarms in stationary hours | alarms per day (extrapolated) | overload (current +45%, 1 step): first alarm on current (s after) | first alarm on any channel (s after) | us per update_residuals (3 channels) |")
    print("|---|--:|--:|---|---|--:|")
    for mode, row in rows.items():
        alarms = sum(row["alarms"])
        print(f"| {mode} | {alarms} | {alarms / hours * 24:.2f} | {fmt(row['current'])} | {fmt(row['any'])} | {float(np.median(row['us'])):.1f} |")
    print("\nFirst adapter after the overload (default judges; the daemon's update path, memory level normal; per seed): " + "; ".join(adapters))


DAY_RT = 86400  # steps in a day of real time


def pretrained_base(data, n_train: int, out_dir: Path | None = None):  # noqa: ANN001, ANN201 - SensorData -> BaseModel (imports stay lazy)
    """A default-size base pretrained (500 steps) on the first `n_train` steps of `data`, saved in
    `out_dir` (a temporary directory when None)."""
    import tempfile

    from edge_daemon.artifacts.base import load_base
    from edge_daemon.config import ModelConfig
    from edge_daemon.frames import build_grid
    from edge_daemon.training.pretrain import pretrain
    from sample_sensors.generate import readings

    grid = build_grid(*readings(data, 0, n_train), len(CHANNELS), 1.0, 5)
    if out_dir is not None:
        pretrain(grid, list(CHANNELS), 1.0, ModelConfig(), out_dir, steps=500)
        return load_base(out_dir, list(CHANNELS), 1.0)
    with tempfile.TemporaryDirectory() as tmp:
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
    from edge_daemon.scoring.serving import Scorer

    scorer = Scorer(base, model, 6.0)
    residuals = np.full(values.shape, np.nan, dtype=np.float32)
    for k in range(len(values)):
        result = scorer.add_step(float(ts[k]), values[k])
        if result is not None and result.model_residual is not None:
            residuals[k] = result.model_residual
    return residuals


def month_table(
    seeds: int, days: int, first_seed: int = 0, train_h: float = 4.0, check_steps: int = 3600, reuse: bool = False
) -> None:
    """False alarms of the residual judges (the window; the window and the CUSUM) at 1 reading/s over
    `days` stationary days per seed.

    As the real-time table: a default-size base pretrained on 00:00-04:00 of day 0, then it scores
    the next `days` days from 04:00 on. Scoring 2.6 M steps through `Scorer.add_step` takes over an
    hour, so the model's residuals are computed in batches (`batched_residuals`; the first
    `check_steps` are checked against `Scorer.add_step`) and fed step by step to a `DriftMonitor`
    with the window alone and to one with the CUSUM on."""
    import torch

    from edge_daemon.artifacts.merge import serving_model

    torch.set_num_threads(1)
    from edge_daemon.drift.feed import base_residual_prior
    from edge_daemon.drift.prior import ResidualPrior

    modes = [mode for mode in RESIDUAL_MODES if mode != "stream"] + [PRIOR_MODE]
    alarms: dict[str, list[list[tuple[int, str]]]] = {mode: [] for mode in modes}
    peaks, us, diffs, calendar = [], {mode: [] for mode in modes}, [], None
    defaults = DriftConfig()
    for seed in range(first_seed, first_seed + seeds):
        started = time.perf_counter()
        n_train, n_test = int(train_h * HOUR_RT), days * DAY_RT
        saved = DATA_DIR / f"month-residuals-seed{seed}-days{days}-train{train_h:g}h.npy"
        saved_prior = saved.with_suffix(".prior.json")
        if reuse and saved.is_file() and saved_prior.is_file():
            residuals = np.load(saved)
            prior = ResidualPrior.from_json(json.loads(saved_prior.read_text()), len(CHANNELS))
            print(f"month seed {seed}: residuals reused from {saved.name}", flush=True)
            month_alarms(residuals, n_train, seed, modes, alarms, us, peaks, started, prior)
            continue
        data = generate_labeled(n_train + n_test, seed=seed)
        base = pretrained_base(data, n_train)
        prior = base_residual_prior(base)
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
        DATA_DIR.mkdir(exist_ok=True)
        np.save(saved, residuals)
        saved_prior.write_text(json.dumps(base.meta.get("validation_residuals")))
        month_alarms(residuals, n_train, seed, modes, alarms, us, peaks, started, prior)
    total_days = seeds * days
    print(f"\nResidual drift at 1 reading/s over {seeds} seed(s) ({first_seed}..{first_seed + seeds - 1}) x {days} stationary days ({days * DAY_RT:,} steps a seed), "
          f"default-size base pretrained on 00:00-0{train_h:g}:00 of day 0 (calendar inputs: {list(calendar or ()) or 'none'}), "
          f"scoring from 0{train_h:g}:00; residuals batched ("
          + (f"max |difference| from Scorer.add_step {max(diffs):.1e}" if diffs else "reused from an earlier run") + ")\n")  # fmt: skip
    print(f"| residual drift | stationary days | false alarms (temp / vib / current) | alarms per 30 days | peak of the default CUSUM per seed (temp, vib, current; h = {defaults.cusum_h:g}) | us per update_residuals (3 channels) |")
    print("|---|--:|--:|--:|---|--:|")
    for mode in modes:
        events = [e for seed_events in alarms[mode] for e in seed_events]
        counts = " / ".join(str(sum(1 for _, ch in events if ch == c)) for c in CHANNELS)
        peak_cell = "; ".join(", ".join(f"{p:.1f}" for p in peak) for peak in peaks) if mode == DEFAULT_MODE else "-"
        print(f"| {mode} | {total_days} | {len(events)} ({counts}) | {len(events) / total_days * 30:.2f} | {peak_cell} | {float(np.median(us[mode])):.1f} |")


def month_alarms(
    residuals: np.ndarray, n_train: int, seed: int, modes: list[str], alarms: dict, us: dict, peaks: list, started: float,
    prior: list | None = None,
) -> None:
    """Feed a month's residuals to each mode's monitor; add its alarms, cost and the CUSUM's peak statistic."""
    for mode in modes:
        settings = {**RESIDUAL_MODES[DEFAULT_MODE if mode == PRIOR_MODE else mode], "residual_window_s": 86400.0}
        if mode == PRIOR_MODE and prior is None:
            raise AssertionError("the base recorded no validation residuals")
        events, cost = residual_events(residuals, settings, 1.0, DEFAULT_START_TS + n_train, peaks if mode == DEFAULT_MODE else None,
                                       prior if mode == PRIOR_MODE else None)  # fmt: skip
        alarms[mode].append(events)
        us[mode].append(cost)
    peak = peaks[-1]
    # How well this base forecasts (bases trained on four hours differ a lot): mean |residual| at night and by day.
    hour = (np.arange(len(residuals)) + n_train) % DAY_RT // HOUR_RT
    night, day = np.nanmean(np.abs(residuals[hour < 6]), axis=0), np.nanmean(np.abs(residuals[(hour >= 7) & (hour < 22)]), axis=0)
    print(f"month seed {seed}: mean |residual| (temp, vib, current) 00-06 h {[round(float(v), 3) for v in night]}, 07-22 h {[round(float(v), 3) for v in day]}", flush=True)
    clock = lambda k: f"day {k // DAY_RT} {k % DAY_RT // 3600:02d}:{k % 3600 // 60:02d}"  # noqa: E731 - k: step of the day-0 stream
    when = lambda events: ", ".join(f"{ch.split('/')[-1]} {clock(k + n_train)}" for k, ch in events) or "none"  # noqa: E731
    print(f"month seed {seed}: " + "; ".join(f"{m} {len(alarms[m][-1])} alarms ({when(alarms[m][-1])})" for m in modes)
          + f"; peak CUSUM {', '.join(f'{p:.1f}' for p in peak)}; {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip


def first_day_table(seeds: int, change_h: float = 7.0, first_seed: int = 0) -> None:
    """The first day after start-up at 1 reading/s, with the residual judges started from the base's
    held-out validation residuals (the default) and without them (learning for a day, as bases
    without `validation_residuals` in their meta are judged). A default-size base is pretrained
    on day 0 (00:00-24:00); the daemon then starts twice: at 00:00 of day 1, which stays stationary
    (false alarms over a whole first day), and at 00:00 of day 2, with the abrupt overload (current
    +45% in one step) at `change_h` of that first day. Residuals batched as in the month table."""
    import torch

    from edge_daemon.artifacts.merge import serving_model
    from edge_daemon.drift.feed import base_residual_prior

    torch.set_num_threads(1)
    change = 2 * DAY_RT + int(change_h * HOUR_RT)
    modes = ("from validation residuals (default)", "learning for a day (no validation residuals)")
    rows: dict[str, dict[str, list]] = {mode: {"alarms": [], "when": [], "current": [], "any": []} for mode in modes}
    for seed in range(first_seed, first_seed + seeds):
        started = time.perf_counter()
        data = generate_labeled(change + 3 * HOUR_RT, seed=seed, regime_change_at=change, regime="overload", ramp_steps=1)
        base = pretrained_base(data, DAY_RT)
        prior = base_residual_prior(base)
        assert prior is not None, "the base recorded no validation residuals"
        values = np.stack([data.values[c][DAY_RT:] for c in CHANNELS], axis=1)
        residuals = batched_residuals(base, serving_model(base, None), data.ts[DAY_RT:], values)
        day1, day2 = residuals[:DAY_RT], residuals[DAY_RT:]
        t1, t2 = float(data.ts[DAY_RT]), float(data.ts[2 * DAY_RT])
        at = int(change_h * HOUR_RT)  # steps into day 2
        for mode in modes:
            with_prior = mode == modes[0]
            stationary = first_day_events(day1, t1, prior if with_prior else None)
            overload = first_day_events(day2, t2, prior if with_prior else None)
            row = rows[mode]
            row["alarms"].append(len(stationary) + sum(1 for k, _ in overload if k < at))
            row["when"] += [f"{ch.split('/')[-1]} {k // HOUR_RT:02d}:{k % HOUR_RT // 60:02d}" for k, ch in stationary]
            row["current"].append(next((k - at for k, ch in overload if k >= at and ch == "m1/current"), None))
            row["any"].append(next((k - at for k, _ in overload if k >= at), None))
        print(f"first-day seed {seed}: " + "; ".join(f"{m}: {r['alarms'][-1]} false alarms, overload found after {r['any'][-1]} s"
                                                     for m, r in rows.items()) + f" ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
    hours = seeds * (24 + change_h)
    print(f"\nThe first day after start-up at 1 reading/s, default-size base pretrained on day 0, seeds {first_seed}..{first_seed + seeds - 1}: a stationary first "
          f"day (24 h) and a first day with the overload at {change_h:02g}:00 ({change_h:g} stationary hours before it) = {hours:g} stationary hours\n")  # fmt: skip
    print("| residual judges after start-up | false alarms in stationary hours | overload: first alarm on current (s after) | first alarm on any channel (s after) | found within 10 min |")
    print("|---|--:|---|---|--:|")
    for mode, row in rows.items():
        found = sum(1 for d in row["any"] if d is not None and d <= 600)
        when = f" ({', '.join(row['when'])})" if row["when"] else ""
        print(f"| {mode} | {sum(row['alarms'])}{when} | {fmt(row['current'])} | {fmt(row['any'])} | {found} of {seeds} |")


def first_day_events(
    residuals: np.ndarray, t0: float, prior: list | None, mon: DriftMonitor | None = None, k0: int = 0
) -> list[tuple[int, str]]:
    """Residual drift events (step, channel) of a default monitor started at t0 (from `prior`, or
    learning), or of `mon` fed on from step k0."""
    mon = mon or DriftMonitor(list(CHANNELS), DriftConfig(), period_s=1.0, residual_prior=prior)
    events = []
    for k in range(len(residuals)):
        events += [(k0 + k, e.channel) for e in mon.update_residuals(residuals[k], t0 + k)]
    return events


def after_adapter_table(seeds: int, adapter_h: float = 6.5, change_h: float = 7.0, first_seed: int = 0) -> None:
    """The first hour after an accepted adapter at 1 reading/s: a base pretrained on day 0 serves from
    00:00 of day 1; at `adapter_h` of day 1 a requested update (the last hour of data, the daemon's
    update path) is accepted and serves; the overload (current +45% in one step) comes at `change_h`.
    The judges restart from the adapter's held-out validation residuals (the default, after starting
    from the base's), or learn as adapters and bases without them get (the window a day, the CUSUM a
    day after start-up and an hour after the adapter)."""
    import tempfile

    import torch

    from edge_daemon.artifacts.adapters import AdapterStore
    from edge_daemon.artifacts.merge import serving_model
    from edge_daemon.drift.feed import base_residual_prior
    from edge_daemon.drift.prior import ResidualPrior

    torch.set_num_threads(1)
    day1, swap, change = DAY_RT, DAY_RT + int(adapter_h * HOUR_RT), DAY_RT + int(change_h * HOUR_RT)
    modes = ("from validation residuals (default)", "learning (no validation residuals)")
    rows: dict[str, dict[str, list]] = {mode: {"alarms": [], "any": [], "current": []} for mode in modes}
    notes: list[str] = []
    for seed in range(first_seed, first_seed + seeds):
        started = time.perf_counter()
        data = generate_labeled(change + 3 * HOUR_RT, seed=seed, regime_change_at=change, regime="overload", ramp_steps=1)
        with tempfile.TemporaryDirectory() as root:
            config = realtime_config(Path(root))
            base = pretrained_base(data, DAY_RT, config.base_dir)
            accepted, wall, reason = first_adapter(config, data, None, float(data.ts[swap - 1]))  # type: ignore[arg-type]
            notes.append(f"seed {seed}: {'accepted' if accepted else 'rejected'} ({reason}; {wall:.0f} s)")
            if not accepted:
                print(f"after-adapter seed {seed}: the update was rejected ({reason}); no case", flush=True)
                continue
            version = AdapterStore(config.adapters_dir).current()
            assert version is not None
            adapter_prior = ResidualPrior.from_json(version.meta.validation_residuals, len(CHANNELS))
            values = np.stack([data.values[c] for c in CHANNELS], axis=1)
            before = batched_residuals(base, serving_model(base, None), data.ts[day1:swap], values[day1:swap])
            lead = base.cfg.window  # the scorer's history fills before the swap
            after = batched_residuals(base, serving_model(base, version), data.ts[swap - lead :], values[swap - lead :])[lead:]
        for mode in modes:
            with_prior = mode == modes[0]
            mon = DriftMonitor(list(CHANNELS), DriftConfig(), period_s=1.0, residual_prior=base_residual_prior(base) if with_prior else None)
            events = first_day_events(before, float(data.ts[day1]), None, mon)
            mon.reset_baseline(float(data.ts[swap]), adapter_prior if with_prior else None)
            events += first_day_events(after, float(data.ts[swap]), None, mon, swap - day1)
            at = change - day1
            row = rows[mode]
            row["alarms"].append(sum(1 for k, _ in events if k < at))
            row["any"].append(next((k - at for k, _ in events if k >= at), None))
            row["current"].append(next((k - at for k, ch in events if k >= at and ch == "m1/current"), None))
        print(f"after-adapter seed {seed}: " + "; ".join(f"{m}: {r['alarms'][-1]} false alarms, overload found after {r['any'][-1]} s"
                                                        for m, r in rows.items()) + f" ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
    print(f"\nThe first hour after an accepted adapter at 1 reading/s: base pretrained on day 0, serving from 00:00 of day 1, a requested "
          f"update accepted at {adapter_h:g} h, the overload at {change_h:g} h; seeds {first_seed}..{first_seed + seeds - 1}\n")  # fmt: skip
    print("| residual judges after the adapter | false alarms 00:00 to the overload | overload: first alarm on current (s after) | first alarm on any channel (s after) | found within 10 min |")
    print("|---|--:|---|---|--:|")
    for mode, row in rows.items():
        found = sum(1 for d in row["any"] if d is not None and d <= 600)
        print(f"| {mode} | {sum(row['alarms'])} | {fmt(row['current'])} | {fmt(row['any'])} | {found} of {len(row['any'])} |")
    print("\nThe updates: " + "; ".join(notes))


LEVEL_CHANNELS = ("m1/vibration", "m1/current")


def level_events(values: np.ndarray, ts: np.ndarray, prior: tuple[np.ndarray, np.ndarray] | None,
                 reset_at: int | None = None, channels: tuple[str, ...] = LEVEL_CHANNELS) -> tuple[list[tuple[int, str]], float]:  # fmt: skip
    """Level drift events (step, channel) of a `DriftMonitor` with `[drift] level_channels` on current
    and vibration (the daemon's judge, fed every step's inputs as the pipeline does), started from
    `prior` (times and values of the store's newest stored data, as the daemon at start-up);
    `reset_at`: the step an adapter is accepted at. Returns the events and us per update_inputs."""
    mon = DriftMonitor(list(CHANNELS), DriftConfig(level_channels=list(channels)), period_s=1.0)
    if prior is not None:
        pts, pvalues = prior
        mon.seed_levels_from([(pts, pvalues[:, c]) for c in range(len(CHANNELS))])
    events: list[tuple[int, str]] = []
    started = time.perf_counter()
    for k in range(len(values)):
        if k == reset_at:
            mon.reset_baseline(float(ts[k]))
        events += [(k, e.channel) for e in mon.update_inputs(values[k], float(ts[k])) if e.kind == "level"]
    return events, (time.perf_counter() - started) / len(values) * 1e6


def level_table(seeds: int, days: int, first_seed: int = 0) -> None:
    """The level judges (`[drift] level_channels` = vibration and current) at 1 reading/s, as the
    daemon runs them: started from the store's newest day (or four hours), fed every step's values.
    No model is involved: an adapter accepted before the overload changes nothing unless a shift is
    under way. Per seed: `days` stationary days after day 0 (false alarms; the judges start at 00:00
    of day 1 from day 0); the overload (current +45% in one step) at 07:00 of the first day after
    start-up (started at 00:00 of day 2 from day 1), at 07:00 half an hour after an accepted
    adapter (started at 00:00 of day 1 from day 0, the adapter at 06:30), and at 07:00 of day 2
    after starting at 04:00 of day 0 with only 00:00-04:00 stored (the real-time table's case)."""
    month: list[tuple[int, str]] = []
    when: list[str] = []
    cases: dict[str, list[int | None]] = {
        "first day after start-up": [], "first day after start-up, nothing stored (learning a day; the baseline)": [],
        "half an hour after an accepted adapter": [], "day 2, started with 4 h stored": [],
    }  # fmt: skip
    false_alarms = {case: 0 for case in cases}
    us: list[float] = []
    temperature = 0
    for seed in range(first_seed, first_seed + seeds):
        started = time.perf_counter()
        data = generate_labeled((days + 1) * DAY_RT, seed=seed)
        ts, values = np.asarray(data.ts), np.stack([data.values[c] for c in CHANNELS], axis=1)
        del data
        # Temperature judged too, for comparison only: its judge is independent of the others'.
        events, cost = level_events(values[DAY_RT:], ts[DAY_RT:], (ts[:DAY_RT], values[:DAY_RT]), channels=tuple(CHANNELS))
        us.append(cost)
        temperature += sum(1 for _, ch in events if ch not in LEVEL_CHANNELS)
        events = [(k, ch) for k, ch in events if ch in LEVEL_CHANNELS]
        month += events
        when += [f"seed {seed} {ch.split('/')[-1]} day {1 + k // DAY_RT} {k % DAY_RT // 3600:02d}:{k % 3600 // 60:02d}" for k, ch in events]
        del ts, values
        change = 2 * DAY_RT + 7 * HOUR_RT
        data = generate_labeled(change + 3 * HOUR_RT, seed=seed, regime_change_at=change, regime="overload", ramp_steps=1)
        ts, values = np.asarray(data.ts), np.stack([data.values[c] for c in CHANNELS], axis=1)
        runs: dict[str, tuple[int, tuple[int, int] | None, int | None]] = {
            "first day after start-up": (2 * DAY_RT, (DAY_RT, 2 * DAY_RT), None),
            "first day after start-up, nothing stored (learning a day; the baseline)": (2 * DAY_RT, None, None),
            "half an hour after an accepted adapter": (DAY_RT, (0, DAY_RT), DAY_RT + int(6.5 * HOUR_RT)),
            "day 2, started with 4 h stored": (4 * HOUR_RT, (0, 4 * HOUR_RT), None),
        }
        for case, (begin, stored, reset_at) in runs.items():
            prior = None if stored is None else (ts[stored[0] : stored[1]], values[stored[0] : stored[1]])
            events, _ = level_events(values[begin:], ts[begin:], prior, None if reset_at is None else reset_at - begin)
            at = change - begin
            false_alarms[case] += sum(1 for k, _ in events if k < at)
            cases[case].append(next((k - at for k, ch in events if k >= at and ch == "m1/current"), None))
        print(f"level seed {seed}: {len(month)} month alarms so far; overload found after "
              + ", ".join(f"{case} {found[-1]} s" for case, found in cases.items()) + f" ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    total = seeds * days
    fmt = lambda ds: ", ".join("missed" if d is None else str(d) for d in ds)  # noqa: E731
    print(f"\nLevel judges on vibration and current at 1 reading/s (k = 2, h = 20, half-minute medians, quarter-hour slices), "
          f"seeds {first_seed}..{first_seed + seeds - 1}\n")  # fmt: skip
    print("| stationary days | false alarms (vibration / current) | alarms per 30 days | temperature, not named (for comparison): alarms per 30 days | us per update_inputs (3 channels, PSI included) |")
    print("|--:|--:|--:|--:|--:|")
    counts = " / ".join(str(sum(1 for _, ch in month if ch == c)) for c in LEVEL_CHANNELS)
    print(f"| {total} | {len(month)} ({counts}){' (' + ', '.join(when) + ')' if when else ''} | {len(month) / total * 30:.2f} "
          f"| {temperature / total * 30:.1f} | {float(np.median(us)):.1f} |")  # fmt: skip
    print("\n| overload (current +45%, 1 step) at 07:00 | false alarms before it | first level alarm on current (s after) | found within 10 min |")
    print("|---|--:|---|--:|")
    for case, found in cases.items():
        within = sum(1 for d in found if d is not None and d <= 600)
        print(f"| {case} | {false_alarms[case]} | {fmt(found)} | {within} of {len(found)} |")


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
                results[mode][name].append(residual_events(residuals, settings, SCALE)[0])
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
