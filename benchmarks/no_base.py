"""What is served while a device has no base: the baselines fitted on its first hours of data.

A new device, or one whose base was found damaged and moved aside, serves the best of the
built-in baselines (persistence, seasonal naive, ridge) fitted on the newest stored readings
(`pretrain.stand_in_base`, the daemon's own fit) until a base is trained. Per seed of the sample
motor at 1 s in real time, the stand-in is fitted on the first 15 minutes, 1, 6 and 24 hours and
serves the next 6 hours through `Scorer`, the serving path. On the same steps: persistence, and
(unless `--no-base`) a base pretrained on the same hours, the daemon's bootstrap (`pretrain`) at
the default model size, served by the same rule. MAE in raw units per channel, skill = 1 - MAE /
persistence's MAE averaged over channels, and the stand-in's fit time (it runs in the daemon's
scheduler thread).

    python benchmarks/no_base.py [--seeds 3] [--hours 0.25,1,6,24] [--pretrain-steps 600] [--no-base]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_daemon.artifacts.base import BaseModel, load_base  # noqa: E402
from edge_daemon.config import ModelConfig  # noqa: E402
from edge_daemon.frames import Grid  # noqa: E402
from edge_daemon.scoring.serving import Scorer, ServingRule  # noqa: E402
from edge_daemon.training.pretrain import pretrain, stand_in_base  # noqa: E402

SERVE_HOURS = 6
RULE = ServingRule()  # the daemon's default: best per channel over the last 600 steps


def served_mae(base: BaseModel, values: np.ndarray, t0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(C,) raw MAE of the served forecasts, of persistence and of the ridge autoregression the
    scorer runs beside them (None without one), on the same steps; and who was served last."""
    scorer = Scorer(base, base.model, anomaly_threshold=6.0, rule=RULE)
    errors: list[np.ndarray] = []
    naive: list[np.ndarray] = []
    ridge: list[np.ndarray] = []
    pending: np.ndarray | None = None
    served = ""
    n = base.cfg.n_channels
    for i, row in enumerate(values):
        if pending is not None:
            errors.append(np.abs(pending - row))
            naive.append(np.abs(values[i - 1] - row))
        result = scorer.add_step(t0 + i, row)
        if pending is not None and result is not None and result.residuals and "ridge" in result.residuals:
            ridge.append(np.abs(result.residuals["ridge"]) * base.norm.std[:n])  # raw units
        pending = result.forecast if result is not None else None
        served = scorer.served
    ridge_mae = np.mean(ridge, axis=0) if len(ridge) == len(errors) else None
    return np.mean(errors, axis=0), np.mean(naive, axis=0), ridge_mae, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hours", default="0.25,1,6,24")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--no-base", action="store_true", help="skip the pretrained base's rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sample_sensors.generate import CHANNELS, generate_labeled

    hours = [float(h) for h in args.hours.split(",")]
    cfg = ModelConfig()
    rows: dict[tuple[float, str], list[tuple[float, float]]] = {}
    fits: dict[float, list[float]] = {}
    served_by: dict[float, list[str]] = {}
    for seed in range(args.seeds):
        n = int((max(hours) + SERVE_HOURS) * 3600)
        data = generate_labeled(n, start_ts=1.7e9, seed=seed)
        values = np.stack([data.values[c] for c in CHANNELS], axis=1).astype(np.float64)
        t0 = float(data.ts[0])
        for h in hours:
            cut = int(h * 3600)
            grid = Grid(t0, 1.0, values[:cut].astype(np.float32))
            started = time.perf_counter()
            stand_in = stand_in_base(grid, list(CHANNELS), cfg)
            fits.setdefault(h, []).append(time.perf_counter() - started)
            later = values[cut : cut + SERVE_HOURS * 3600]
            mae, naive, ridge, served = served_mae(stand_in, later, t0 + cut)
            served_by.setdefault(h, []).append(served)
            rows.setdefault((h, "persistence"), []).append((float(np.mean(naive)), 0.0))
            if ridge is not None:
                rows.setdefault((h, "ridge autoregression alone (fitted on the same hours)"), []).append(
                    (float(np.mean(ridge)), float(np.mean(1 - ridge / naive)))
                )
            rows.setdefault((h, "baselines served (no base)"), []).append((float(np.mean(mae)), float(np.mean(1 - mae / naive))))
            if not args.no_base:
                with tempfile.TemporaryDirectory() as out:
                    pretrain(grid, list(CHANNELS), 1.0, cfg, Path(out), steps=args.pretrain_steps, seed=seed)
                    base = load_base(Path(out))
                mae, naive, _, _ = served_mae(base, later, t0 + cut)
                rows.setdefault((h, f"base pretrained on the same hours ({args.pretrain_steps} steps), served"), []).append(
                    (float(np.mean(mae)), float(np.mean(1 - mae / naive)))
                )
            print(f"seed {seed}, {h:g} h: done", file=sys.stderr, flush=True)

    print(f"Sample motor at 1 s, {args.seeds} seeds; fitted on the first hours, served for the next {SERVE_HOURS} h.")
    print("MAE: raw units, mean over channels and seeds; skill: 1 - MAE / persistence's MAE, mean over channels and seeds.\n")
    print("| fitted on | forecaster | MAE | skill |")
    print("|---|---|---|---|")
    for (h, name), values_ in rows.items():
        mae = statistics.fmean(v[0] for v in values_)
        skill = statistics.fmean(v[1] for v in values_)
        print(f"| {h:g} h | {name} | {mae:.4f} | {skill:+.1%} |")
    print("\n| fitted on | stand-in fit time, s (median) | served at the end (per seed) |")
    print("|---|---|---|")
    for h in hours:
        print(f"| {h:g} h | {statistics.median(fits[h]):.2f} | {', '.join(served_by[h])} |")


if __name__ == "__main__":
    main()
