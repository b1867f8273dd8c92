"""Synthetic multichannel motor data, reproducible from a seed.

Owns the simulated motor behind the sample stream: a daily load schedule and
ambient cycle, load-dependent current, winding temperature lagging the current
through a thermal time constant, load-dependent vibration with noise, short
spikes, and an optional regime change (bearing wear or a current-sensor
recalibration). Also writes the data as a wide CSV.

The physics runs on its own clock: `time_scale` physical seconds pass per
second of the timestamp timeline, so a demo of a few thousand one-second steps
can see whole days (time_scale=144 puts one day in 600 steps of 1 s). The load
schedule's 15-minute batch cycle and the 20-minute thermal lag are physical
times too; keep `period_s * time_scale` below ~150 s or the batch cycle aliases.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

SENSOR = "m1"
CHANNELS: tuple[str, ...] = (f"{SENSOR}/temperature", f"{SENSOR}/vibration", f"{SENSOR}/current")
UNITS: dict[str, str] = {CHANNELS[0]: "degC", CHANNELS[1]: "mm/s RMS", CHANNELS[2]: "A"}
# Sensor resolution: values are quantised as a real transmitter would send them,
# which also keeps payloads short and makes JSON round-trips exact.
DECIMALS: dict[str, int] = {CHANNELS[0]: 2, CHANNELS[1]: 3, CHANNELS[2]: 3}
# A fixed default start (2024-01-01T00:00:00Z) keeps generate() reproducible
# without the caller choosing a time; the publisher picks a recent one instead.
DEFAULT_START_TS = 1_704_067_200.0
DAY_S = 86_400.0

Regime = Literal["bearing_wear", "current_recalibration", "overload"]
REGIMES: tuple[str, ...] = ("bearing_wear", "current_recalibration", "overload")
# 'overload': the current jumps by this share of itself (a clogged impeller, a jammed
# conveyor); with ramp_steps=1 the abrupt shift a fast residual judge must catch.
OVERLOAD_JUMP = 0.45


@dataclass
class MotorParams:
    """Physical constants of the simulated motor (defaults: a ~7.5 kW pump motor)."""

    ambient_mean_c: float = 20.0  # daily mean of the room temperature
    ambient_swing_c: float = 4.0  # half the day/night swing, warmest at 15:00
    current_idle_a: float = 4.0  # magnetising current at no load
    current_full_a: float = 12.0  # added current at full load
    heating_c_per_a2: float = 0.16  # steady-state winding rise per A^2 (copper losses)
    thermal_tau_s: float = 1200.0  # winding thermal time constant
    batch_cycle_s: float = 900.0  # period of the process's batch cycle
    batch_depth: float = 0.12  # load modulation by the batch cycle
    vibration_base_mm_s: float = 0.8  # vibration RMS at no load
    vibration_per_load_mm_s: float = 1.6  # added RMS at full load
    spike_rate: float = 0.003  # chance per step of a short anomaly on some channel
    noise: dict[str, float] = field(
        default_factory=lambda: {CHANNELS[0]: 0.05, CHANNELS[1]: 0.06, CHANNELS[2]: 0.08}
    )  # temperature and current: absolute std; vibration: relative std


@dataclass
class SensorData:
    """Generated readings with their ground truth (where spikes and the regime change are)."""

    ts: np.ndarray  # (N,) unix seconds of each step
    values: dict[str, np.ndarray]  # channel -> (N,) readings, in CHANNELS order
    anomalies: dict[str, np.ndarray]  # channel -> (N,) bool, True where a spike was injected
    load: np.ndarray  # (N,) true load fraction in [0, 1] behind the readings
    regime_change_at: int | None
    regime: str


def readings(data: SensorData, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps [start, stop) as flat (ts, channel index, value) arrays, channels in CHANNELS order.

    The form edge-daemon's replay store returns from `read()`, so
    `frames.build_grid(*readings(data, 0, n), len(CHANNELS), period_s, max_fill)`
    gives the grid a base model trains on.
    """
    stop = len(data.ts) if stop is None else stop
    n = stop - start
    ts = np.repeat(data.ts[start:stop], len(CHANNELS))
    channel_idx = np.tile(np.arange(len(CHANNELS)), n)
    values = np.stack([data.values[c][start:stop] for c in CHANNELS], axis=1).reshape(-1)
    return ts, channel_idx, values


def timestamps(n_steps: int, period_s: float = 1.0, start_ts: float = DEFAULT_START_TS) -> np.ndarray:
    """The timestamp of every step: start_ts + k * period_s, rounded to microseconds."""
    return np.round(start_ts + np.arange(n_steps, dtype=np.float64) * period_s, 6)


def _smoothstep(x: np.ndarray, at_h: float, width_h: float = 0.25) -> np.ndarray:
    """0 before hour `at_h`, 1 after, a logistic transition of about `width_h` hours."""
    return 1.0 / (1.0 + np.exp(-(x - at_h) / width_h))


def load_schedule(hour: np.ndarray) -> np.ndarray:
    """Planned load fraction by hour of day: night base, day shift with a lunch dip, evening shift."""
    day = _smoothstep(hour, 6.0) - _smoothstep(hour, 22.0)  # 06:00-22:00 the line runs
    lunch = _smoothstep(hour, 12.0) - _smoothstep(hour, 13.0)
    evening = _smoothstep(hour, 17.0)  # second shift runs lighter
    return 0.25 + 0.6 * day - 0.3 * lunch * day - 0.25 * evening * day


def _ar1(rng: np.random.Generator, n: int, phi: float, std: float) -> np.ndarray:
    """A stationary AR(1) series with marginal standard deviation `std`."""
    shocks = rng.normal(0.0, std * math.sqrt(max(1.0 - phi * phi, 1e-12)), n)
    out = np.empty(n)
    level = rng.normal(0.0, std)
    for k in range(n):
        level = phi * level + shocks[k]
        out[k] = level
    return out


def generate_labeled(
    n_steps: int,
    period_s: float = 1.0,
    start_ts: float = DEFAULT_START_TS,
    seed: int = 0,
    regime_change_at: int | None = None,
    time_scale: float = 1.0,
    *,
    regime: Regime = "bearing_wear",
    ramp_steps: int = 20,
    params: MotorParams | None = None,
) -> SensorData:
    """Simulate `n_steps` readings of every channel, with ground truth.

    `regime_change_at` is the step from which the regime applies (reached over
    `ramp_steps`); None means no change. `regime` is 'bearing_wear' (vibration
    level and variance rise, the bearing runs hotter and draws a little more
    current), 'current_recalibration' (the current sensor's gain and offset
    change; temperature still follows the true current) or 'overload' (the
    motor's current jumps by OVERLOAD_JUMP of itself and the winding heats up
    accordingly; pass ramp_steps=1 for an abrupt jump).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if period_s <= 0 or time_scale <= 0:
        raise ValueError(f"period_s and time_scale must be > 0, got {period_s} and {time_scale}")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    if regime_change_at is not None and not 0 <= regime_change_at <= n_steps:
        raise ValueError(f"regime_change_at must be in [0, {n_steps}], got {regime_change_at}")
    p = params or MotorParams()
    rng = np.random.default_rng(seed)
    temp_ch, vib_ch, cur_ch = CHANNELS

    ts = timestamps(n_steps, period_s, start_ts)
    dt = period_s * time_scale  # physical seconds per step
    phys_t = start_ts + np.arange(n_steps) * dt  # the motor's own clock
    hour = (phys_t % DAY_S) / 3600.0

    # Regime weight: 0 before the change, 1 after, linear over ramp_steps.
    shift = np.zeros(n_steps)
    if regime_change_at is not None:
        k = np.arange(n_steps) - regime_change_at
        shift = np.clip((k + 1) / max(ramp_steps, 1), 0.0, 1.0)
    wear = shift if regime == "bearing_wear" else np.zeros(n_steps)
    recalibration = shift if regime == "current_recalibration" else np.zeros(n_steps)
    overload = shift if regime == "overload" else np.zeros(n_steps)

    # Load: daily schedule x batch cycle (its phase wanders slowly) + short-term jitter.
    phase_drift = np.cumsum(rng.normal(0.0, 0.02 * math.sqrt(dt / 60.0), n_steps))
    batch = np.sin(2 * math.pi * phys_t / p.batch_cycle_s + rng.uniform(0, 2 * math.pi) + phase_drift)
    jitter = _ar1(rng, n_steps, math.exp(-dt / 120.0), 0.03)
    load = np.clip(load_schedule(hour) * (1.0 + p.batch_depth * batch) + jitter, 0.05, 1.0)

    # Current follows load at once; worn bearings add friction torque.
    true_current = (p.current_idle_a + p.current_full_a * load + 0.4 * wear) * (1.0 + OVERLOAD_JUMP * overload)

    # Ambient: sinusoidal day (warmest at 15:00) plus slow weather wander.
    weather = _ar1(rng, n_steps, math.exp(-dt / (6 * 3600.0)), 1.0)
    ambient = p.ambient_mean_c + p.ambient_swing_c * np.sin(2 * math.pi * (hour - 9.0) / 24.0) + weather

    # Winding temperature: first-order lag towards ambient + copper-loss rise, discretised
    # exactly (alpha from the time constant) so any step size stays stable.
    # Worn-bearing friction heat grows with load.
    target = ambient + p.heating_c_per_a2 * true_current**2 + wear * (3.0 + 4.0 * load)
    alpha = 1.0 - math.exp(-dt / p.thermal_tau_s)
    temperature = np.empty(n_steps)
    level = target[0]
    for k in range(n_steps):
        level += alpha * (target[k] - level)
        temperature[k] = level

    # Vibration RMS: rises with load; wear raises level, load sensitivity and scatter.
    vib_wander = _ar1(rng, n_steps, math.exp(-dt / 300.0), 0.05)
    vibration = p.vibration_base_mm_s + p.vibration_per_load_mm_s * load + vib_wander
    vibration = vibration * (1.0 + 0.9 * wear) + 0.6 * wear
    vib_rel_noise = p.noise[vib_ch] * (1.0 + 2.0 * wear)
    vibration = vibration * (1.0 + rng.normal(0.0, 1.0, n_steps) * vib_rel_noise)

    # What the sensors report: measurement noise, and a recalibrated current transmitter.
    measured_current = true_current + rng.normal(0.0, p.noise[cur_ch], n_steps)
    measured_current = measured_current * (1.0 + 0.15 * recalibration) + 0.8 * recalibration
    measured_temp = temperature + rng.normal(0.0, p.noise[temp_ch], n_steps)

    values = {temp_ch: measured_temp, vib_ch: vibration, cur_ch: measured_current}
    anomalies = {ch: np.zeros(n_steps, dtype=bool) for ch in CHANNELS}
    _inject_spikes(rng, values, anomalies, p.spike_rate)

    values[vib_ch] = np.maximum(values[vib_ch], 0.0)  # an RMS is never negative
    values[cur_ch] = np.maximum(values[cur_ch], 0.0)
    values = {ch: np.round(v, DECIMALS[ch]) for ch, v in values.items()}
    return SensorData(
        ts=ts, values=values, anomalies=anomalies, load=load, regime_change_at=regime_change_at, regime=regime
    )


def _inject_spikes(
    rng: np.random.Generator, values: dict[str, np.ndarray], anomalies: dict[str, np.ndarray], rate: float
) -> None:
    """Add short anomalies in place: vibration impacts, current inrush, temperature-probe glitches."""
    n = len(anomalies[CHANNELS[0]])
    starts = np.flatnonzero(rng.random(n) < rate)
    kinds = rng.choice(3, size=len(starts), p=[0.5, 0.3, 0.2])
    for start, kind in zip(starts, kinds, strict=True):
        channel = CHANNELS[(1, 2, 0)[kind]]  # vibration, current, temperature
        length = int(rng.integers(1, 4))
        span = slice(start, min(start + length, n))
        if channel.endswith("vibration"):
            values[channel][span] += rng.uniform(3.0, 8.0)
        elif channel.endswith("current"):
            values[channel][span] *= rng.uniform(1.3, 1.6)
        else:
            values[channel][span] += rng.choice([-1.0, 1.0]) * rng.uniform(3.0, 8.0)
        anomalies[channel][span] = True


def generate(
    n_steps: int,
    period_s: float = 1.0,
    start_ts: float = DEFAULT_START_TS,
    seed: int = 0,
    regime_change_at: int | None = None,
    time_scale: float = 1.0,
    *,
    regime: Regime = "bearing_wear",
) -> dict[str, np.ndarray]:
    """Readings per channel (CHANNELS order), each an (n_steps,) float array; see generate_labeled."""
    data = generate_labeled(
        n_steps, period_s, start_ts, seed, regime_change_at, time_scale, regime=regime
    )
    return data.values


def to_csv(
    path: str | Path,
    n_steps: int,
    period_s: float = 1.0,
    start_ts: float = DEFAULT_START_TS,
    seed: int = 0,
    regime_change_at: int | None = None,
    time_scale: float = 1.0,
    *,
    regime: Regime = "bearing_wear",
) -> Path:
    """Write generated data as wide CSV: header `ts,m1/temperature,m1/vibration,m1/current`."""
    values = generate(n_steps, period_s, start_ts, seed, regime_change_at, time_scale, regime=regime)
    return write_csv(path, timestamps(n_steps, period_s, start_ts), values)


def write_csv(path: str | Path, ts: np.ndarray, values: dict[str, np.ndarray]) -> Path:
    """Write readings as wide CSV, one row per step, columns `ts` then the channels in order."""
    path = Path(path)
    channels = list(values)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ts", *channels])
        for k in range(len(ts)):
            # repr of a float round-trips exactly, so the CSV holds what the publisher sends.
            writer.writerow([repr(float(ts[k])), *(repr(float(values[ch][k])) for ch in channels)])
    log.info("wrote %d rows of %d channels to %s", len(ts), len(channels), path)
    return path


def read_csv(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a wide CSV written by write_csv back into (ts, {channel: values})."""
    with Path(path).open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if not header or header[0] != "ts":
            raise ValueError(f"{path}: first column must be 'ts', got {header[:1]}")
        rows = [[float(x) for x in row] for row in reader if row]
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return table[:, 0], {ch: table[:, i + 1] for i, ch in enumerate(header[1:])}


def main(argv: list[str] | None = None) -> int:
    """`python -m sample_sensors.generate --steps N --out data.csv`: write sample data to a CSV."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_sensors.generate",
        description="Write synthetic motor sensor data as a wide CSV.",
        epilog="example: python -m sample_sensors.generate --steps 3000 --time-scale 144 "
        "--regime-change-at 2000 --out motor.csv",
    )
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write")
    parser.add_argument("--steps", type=int, default=3600, help="number of time steps (default 3600)")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between steps (default 1)")
    parser.add_argument("--start-ts", type=float, default=DEFAULT_START_TS, help="unix time of step 0")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--regime-change-at", type=int, default=None, help="step at which the regime changes")
    parser.add_argument("--regime", choices=REGIMES, default="bearing_wear", help="kind of regime change")
    parser.add_argument("--time-scale", type=float, default=1.0, help="physical seconds per timeline second")
    args = parser.parse_args(argv)
    to_csv(
        args.out, args.steps, args.period, args.start_ts, args.seed, args.regime_change_at, args.time_scale,
        regime=args.regime,
    )
    print(f"wrote {args.steps} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
