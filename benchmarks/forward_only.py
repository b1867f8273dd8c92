"""Forward-only updates against backpropagation on the sample motor's regime changes.

    python benchmarks/forward_only.py --seeds 3
    python benchmarks/forward_only.py --cases retuned --seeds 1 --lr 1e-3 2e-3 4e-3   # the learning rate

Per case and seed, the data of `adapt_cases.py` (three days of the sample motor at 10 s, one
hour of a new regime, a base pretrained on the old one, replay from the older days) and, on the
same windows and seed: the frozen base, the update by backpropagation (the project's defaults)
and the forward-only update (`[train] forward_only = "on"`: SPSA on the same LoRA, two forwards a
step, `forward_only_step_factor` steps for each of the backpropagation's). MAE in normalised units
on the next 3 hours of the new regime; "share of the gain" is how much of backpropagation's cut
of the frozen base's MAE the forward-only update makes. Beside them, on the same windows and
positions: persistence and the ridge autoregression fitted on the update's hour. Both adapters are
measured whether or not the gate accepts them (its verdict is beside them). Wall time is the
update's alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import baseline_models, mae, pretrain  # noqa: E402
from adapt_cases import DAY, HOUR, cut, motor  # noqa: E402

from edge_daemon.config import LoraConfigSection, TrainConfig  # noqa: E402
from edge_daemon.model import Forecaster, ForecasterConfig  # noqa: E402
from edge_daemon.training.loop import update  # noqa: E402
from edge_daemon.training.plan import plan_from_config  # noqa: E402

WINDOW = 32


def case_data(case: str, seed: int, pretrain_steps: int) -> tuple[Forecaster, dict[str, torch.Tensor], torch.Tensor]:
    """The base, the update's windows and the held-out next 3 h of the new regime."""
    _ts, values, is_new = motor(case, seed)
    change = 3 * DAY
    now = change + HOUR
    mean, std = values[:change][~is_new[:change]].mean(0), values[:change][~is_new[:change]].std(0) + 1e-6
    x = torch.from_numpy(((values - mean) / std).astype(np.float32))
    length = WINDOW + 1
    old_rows = np.flatnonzero(~is_new[:change])
    torch.manual_seed(seed)
    base = Forecaster(ForecasterConfig(n_channels=3, window=WINDOW, d_model=32, n_layers=2, d_ff=64))
    pretrain(base, cut(x, old_rows[old_rows < change - DAY // 2], length, 5), pretrain_steps, seed=seed)
    recent = cut(x, np.arange(change, now - length), length, 1)
    n_val = max(1, len(recent) // 5)
    rng = np.random.default_rng(seed)
    history = np.arange(0, change - length)
    replay = cut(x, np.sort(rng.choice(history, size=min(len(history), 400), replace=False)), length, 1)
    replay = replay[torch.from_numpy(rng.permutation(len(replay)))]
    n_rval = len(replay) // 5
    data = {"recent_train": recent[:-n_val], "recent_val": recent[-n_val:], "replay_train": replay[n_rval:], "replay_val": replay[:n_rval]}
    new_later = np.flatnonzero(is_new[now:]) + now
    return base, data, cut(x, new_later[: 3 * HOUR], length, 7)


def run(case: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    base, data, new_eval = case_data(case, seed, args.pretrain_steps)
    frozen = mae(base, new_eval)
    rows: list[dict[str, Any]] = []
    hour = torch.cat([data["recent_train"], data["recent_val"]])
    for label, model in baseline_models(base.cfg, hour).items():
        rows.append({"case": case, "seed": seed, "update": label, "frozen": frozen, "after": mae(model, new_eval), "share": float("nan"), "accepted": None, "steps": 0, "wall_s": 0.0})
    settings: list[tuple[str, dict[str, Any]]] = [("backprop", {"forward_only": "off"})]
    settings += [(f"forward-only lr {lr:g}", {"forward_only": "on", "forward_only_lr": lr, "forward_only_step_factor": args.factor}) for lr in args.lr]
    backprop = None
    for label, extra in settings:
        cfg = TrainConfig(steps=args.steps, **extra)
        started = time.monotonic()
        result = update(base, **data, lora_cfg=LoraConfigSection(), train_cfg=cfg, plan=plan_from_config(cfg), seed=seed, keep_rejected=True)
        wall = time.monotonic() - started
        after = mae(result.adapted, new_eval)
        if label == "backprop":
            backprop = after
        share = (frozen - after) / (frozen - backprop) if backprop is not None and frozen != backprop else float("nan")
        rows.append({"case": case, "seed": seed, "update": label, "frozen": frozen, "after": after, "share": share,
                     "accepted": result.accepted, "steps": result.steps, "wall_s": wall})  # fmt: skip
        print(f"  {case} seed {seed} {label}: frozen {frozen:.4f} -> {after:.4f} (share {share:.2f}), {result.steps} steps, {wall:.1f} s, {'accepted' if result.accepted else 'rejected'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=["retuned", "permanent"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="backpropagation's optimizer steps (the default update's)")
    parser.add_argument("--factor", type=int, default=TrainConfig().forward_only_step_factor)
    parser.add_argument("--lr", type=float, nargs="*", default=[TrainConfig().forward_only_lr])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for case in args.cases for seed in range(args.seeds) for row in run(case, seed, args)]
    print(f"\nsample motor at 10 s, window {WINDOW}, model d_model 32 x 2 layers, backprop {args.steps} steps, forward-only x{args.factor}, {args.seeds} seeds\n")
    print("| case | update | frozen base MAE | after | cut vs frozen | share of backprop's gain | accepted | steps | wall s |")
    print("| --- | --- | --: | --: | --: | --: | --: | --: | --: |")
    for case in args.cases:
        for label in dict.fromkeys(r["update"] for r in rows):
            sel = [r for r in rows if r["case"] == case and r["update"] == label]
            frozen, after = statistics.mean(r["frozen"] for r in sel), statistics.mean(r["after"] for r in sel)
            share = statistics.mean(r["share"] for r in sel)
            if sel[0]["accepted"] is None:  # a baseline: no update, no gate
                print(f"| {case} | {label} | {frozen:.4f} | {after:.4f} | {100 * (1 - after / frozen):.1f}% | - | - | - | - |")
                continue
            print(f"| {case} | {label} | {frozen:.4f} | {after:.4f} | {100 * (1 - after / frozen):.1f}% | {share:.2f} | "
                  f"{sum(r['accepted'] for r in sel)}/{len(sel)} | {sel[0]['steps']} | {statistics.mean(r['wall_s'] for r in sel):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
