"""Adaptation quality: one LoRA update after a regime change, against the frozen base and full fine-tuning.

A base learns the old regime; the data then switch to a new one (other
period, amplitude, level and channel coupling). Reported per seed and on
average: forecast MAE on held-out new-regime windows for the frozen base, one
update (project defaults: replay mixing, selective freezing, gate) and full
fine-tuning on the same batches; and MAE on held-out old-regime windows
before and after (forgetting).

    python benchmarks/adapt.py [--seeds 3] [--steps 60]

`--cases permanent retuned alternating recalibration` runs the gate's cases on the sample motor instead
(`adapt_cases.py`: always accept, today's gate and the new gate on the same data).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from _common import OLD, make_data, mae, pretrain, regime_windows

from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
from edge_daemon.training.plan import plan_from_config
from edge_daemon.training.batches import BatchMixer
from edge_daemon.training.loop import update


def full_fine_tune(base: Forecaster, data: dict[str, torch.Tensor], cfg: TrainConfig, lr: float, seed: int) -> Forecaster:
    """Every weight trainable, the same mixed batches and steps as the update."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    mixer = BatchMixer(data["recent_train"], data["replay_train"], cfg.batch_size, cfg.replay_fraction, torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(cfg.steps):
        windows, _ = mixer.next_batch()
        loss = forecast_loss(model, windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = Forecaster(ForecasterConfig(n_channels=3, window=args.window))
    pretrain(base, regime_windows(OLD, 1024, args.window + 1, seed=1000 + seed), args.pretrain_steps, seed=seed)
    data = make_data(args.window, seed=10 * seed)
    lora_cfg = LoraConfigSection(max_blocks=args.max_blocks, r=args.rank, extra_modules=args.extra_modules)
    train_cfg = TrainConfig(steps=args.steps, lr=args.lr)
    started = time.monotonic()
    result = update(base, **data, lora_cfg=lora_cfg, train_cfg=train_cfg, plan=plan_from_config(train_cfg), seed=seed, keep_rejected=True)
    update_s = time.monotonic() - started
    assert result.adapted is not None
    started = time.monotonic()
    full = full_fine_tune(base, data, train_cfg, args.full_lr, seed)
    full_s = time.monotonic() - started
    return {
        "seed": seed,
        "new_base": mae(base, data["recent_val"]),
        "new_update": mae(result.adapted, data["recent_val"]),
        "new_full": mae(full, data["recent_val"]),
        "old_base": mae(base, data["replay_val"]),
        "old_update": mae(result.adapted, data["replay_val"]),
        "old_full": mae(full, data["replay_val"]),
        "accepted": result.accepted,
        "replay_mse_ratio": result.metrics_after["replay_val_loss"] / result.metrics_before["replay_val_loss"],
        "gate": result.reason,
        "blocks": result.chosen_blocks,
        "trainable": result.trainable_params,
        "update_s": update_s,
        "full_s": full_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps, help="optimizer steps of the update and of full fine-tuning")
    parser.add_argument("--lr", type=float, default=TrainConfig().lr, help="update learning rate")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    parser.add_argument("--max-blocks", type=int, default=LoraConfigSection().max_blocks)
    parser.add_argument("--rank", type=int, default=LoraConfigSection().r)
    parser.add_argument("--extra-modules", nargs="*", default=LoraConfigSection().extra_modules, help="e.g. head embed")
    parser.add_argument("--cases", nargs="*", choices=("permanent", "retuned", "alternating", "recalibration", "forgetting"), help="the gate on permanent and recurring changes of the sample motor (window 32 unless --window)")
    args = parser.parse_args()
    if args.cases is not None:
        import adapt_cases

        if args.window == 64:
            args.window = 32
        if args.pretrain_steps == 600:
            args.pretrain_steps = 300
        adapt_cases.main(argparse.Namespace(**{**vars(args), "cases": args.cases or list(adapt_cases.CASES)}))
        return
    torch.set_num_threads(1)

    runs = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"window {args.window}, update: {args.steps} steps, lr {args.lr}, gate tolerance {TrainConfig().gate_tolerance}, max_blocks {args.max_blocks}, r {args.rank}, extra {args.extra_modules}; full fine-tune lr {args.full_lr}\n")
    print("| seed | new: base | new: update | new: full FT | old: base | old: update | old: full FT | gate (replay loss after/before) | blocks | update s | full FT s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for r in runs:
        print(
            f"| {r['seed']} | {r['new_base']:.4f} | {r['new_update']:.4f} | {r['new_full']:.4f} | {r['old_base']:.4f} | "
            f"{r['old_update']:.4f} | {r['old_full']:.4f} | {'accepted' if r['accepted'] else 'rejected'} ({r['replay_mse_ratio']:.2f}) | {r['blocks']} | "
            f"{r['update_s']:.1f} | {r['full_s']:.1f} |"
        )
    mean = {k: statistics.fmean(r[k] for r in runs) for k in ("new_base", "new_update", "new_full", "old_base", "old_update", "old_full")}
    better = 1 - mean["new_update"] / mean["new_base"]
    vs_full = mean["new_update"] / mean["new_full"] - 1
    forgetting = mean["old_update"] / mean["old_base"] - 1
    print("\n| target | measured (mean MAE over seeds) | met |\n| --- | ---: | --- |")
    print(f"| new regime: update >= 30% better than frozen base | {better:+.1%} | {'yes' if better >= 0.30 else 'NO'} |")
    print(f"| new regime: update within 10% of full fine-tuning | {vs_full:+.1%} | {'yes' if vs_full <= 0.10 else 'NO'} |")
    print(f"| old regime: update <= 10% worse than before | {forgetting:+.1%} | {'yes' if forgetting <= 0.10 else 'NO'} |")
    print(f"\n(full fine-tuning's own forgetting: {mean['old_full'] / mean['old_base'] - 1:+.1%})")


if __name__ == "__main__":
    main()
