"""Scoring cost per grid step: one intra-op thread (what the daemon runs) against torch's default pool.

Every row scores the same stream with the same default-size base model (calendar
inputs on) and the built-in baselines through `Scorer.add_step`, the daemon's
serving path. "other core busy" starts one
CPU-bound process beside it, as a device's own work would. The ratio is
against one thread on an otherwise idle machine, measured in the same run.

    python benchmarks/scoring.py [--steps 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_daemon.artifacts.base import BaseModel  # noqa: E402
from edge_daemon.baselines import Persistence, RidgeAR, SeasonalNaive  # noqa: E402
from edge_daemon.config import ModelConfig  # noqa: E402
from edge_daemon.frames import NormStats  # noqa: E402
from edge_daemon.model import Forecaster  # noqa: E402
from edge_daemon.training.pretrain import calendar_periods, forecaster_config  # noqa: E402
from edge_daemon.scoring.serving import Scorer  # noqa: E402

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]


def _base() -> BaseModel:
    """The daemon's default model at 1 s (both calendar inputs, as for a base trained on weeks of
    data; the next step and 32 ahead), and the baselines every step runs beside it at both
    horizons: persistence, a 96-step season, ridge on 16 lags."""
    torch.manual_seed(0)
    defaults = ModelConfig()
    cfg = forecaster_config(defaults, 3, calendar_periods(defaults.calendar, 30 * 86400.0), period_s=1.0)  # horizons 1, 32
    model = Forecaster(cfg).eval()
    norm = NormStats(np.zeros(3), np.ones(3))
    rng = np.random.default_rng(0)
    coef = {h: rng.normal(0.0, 0.01, (cfg.lags * 3 + 1, 3)) for h in cfg.horizons}
    ridge = RidgeAR(cfg.lags, coef[1], 1.0, {h: c for h, c in coef.items() if h > 1})
    meta = {"baselines": [Persistence().to_dict(), SeasonalNaive(96).to_dict(), ridge.to_dict()]}
    return BaseModel(model, cfg, norm, CHANNELS, 1.0, np.ones(3, np.float32), meta, Path("."), "bench")


def ms_per_step(base: BaseModel, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    scorer = Scorer(base, base.model, anomaly_threshold=6.0)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(steps + base.cfg.window, 3))
    for k in range(base.cfg.window):  # fill the window first
        scorer.add_step(float(k), values[k])
    started = time.perf_counter()
    for k in range(base.cfg.window, base.cfg.window + steps):
        scorer.add_step(float(k), values[k])
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = _base()
    rows: list[tuple[str, int, float, float, float]] = []
    reference = None
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for threads in (1, 2):
                times = [ms_per_step(base, threads, args.steps) for _ in range(args.repeats)]
                median = statistics.median(times)
                if reference is None:
                    reference = median
                rows.append(("busy" if busy else "idle", threads, median, max(times), median / reference))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print(f"default model ({sum(p.numel() for p in base.model.parameters()):,} parameters), {args.steps} steps, median of {args.repeats}")
    print("| other core | intra-op threads | ms per step | worst run | x 1 thread idle |")
    print("|---|--:|--:|--:|--:|")
    for state, threads, median, worst, ratio in rows:
        print(f"| {state} | {threads} | {median:.2f} | {worst:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
