"""Memory benchmark: serving vs full fine-tune vs plain PEFT vs this project's update.

Every row runs in a fresh Python process, so one row's allocator state and
imports never flatter another's. Same base model, data, effective batch and
optimizer steps for every training row; synthetic data from `_common`.

    python benchmarks/memory.py                 # default (~1e5 params, window 64) and large (~4.8M, window 256)
    python benchmarks/memory.py --size default --json out.json
    python benchmarks/memory.py --size default --no-budget   # skip the smallest-budget search

On the default model it also bisects the smallest memory budget, as a
multiple of the serving peak, under which an update still completes, and
reports which plan ran (fresh process per probe, watchdog budget set).

How the libraries are counted: `import torch` is in every row's baseline.
`import peft` (which pulls in transformers, and bitsandbytes, whose import
builds torch.compile wrappers) costs ~180 MB more; the PEFT rows import it
before their baseline, so "increase" is what the work itself costs. The
"over torch-only" column measures the same peak against the serving row's
peft-free baseline, i.e. what a device pays relative to a daemon that serves
merged weights without peft. Peak ratios are given against both serving rows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_daemon.config import LoraConfigSection  # pydantic only: no torch in the parent process

ROWS = ("serving", "serving+peft", "full fine-tune", "plain PEFT", "update", "update (loose plan)")
SIZES: dict[str, dict[str, Any]] = {
    # steps = optimizer steps of every training row; pretrain = steps that make the base
    "default": {"model": {"window": 64}, "steps": 60, "pretrain": 400},
    "large": {"model": "LARGE", "steps": 12, "pretrain": 30},
}
BATCH = 32  # effective batch of every training row, and the scoring batch
UPDATE_PLAN = {"micro_batch": 8, "accumulation": 4, "checkpointing": True, "optimizer": "adamw8bit"}
# The same update with every memory technique off: separates their cost from
# that of selective freezing, the probe and the gate.
LOOSE_PLAN = {"micro_batch": BATCH, "accumulation": 1, "checkpointing": False, "optimizer": "adamw"}
LR_LORA = 3e-3
LR_FULL = 1e-3  # full fine-tuning moves every weight: a smaller step, as usual
MAX_BLOCKS = 2


def model_config(size: str) -> Any:
    from edge_daemon.model import LARGE, ForecasterConfig

    spec = SIZES[size]["model"]
    return ForecasterConfig(n_channels=3, **(LARGE if spec == "LARGE" else spec))


def lora_rank() -> int:
    return LoraConfigSection().r


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# --- child side ---------------------------------------------------------------


def prepare(size: str, workdir: Path) -> dict[str, Any]:
    """Pretrain a base on the old regime and save it for the rows."""
    import torch
    from _common import OLD, pretrain, regime_windows

    from edge_daemon.model import Forecaster

    torch.manual_seed(0)
    cfg = model_config(size)
    base = Forecaster(cfg)
    started = time.monotonic()
    loss = pretrain(base, regime_windows(OLD, 512, cfg.window + 1, seed=100), SIZES[size]["pretrain"], batch=BATCH)
    torch.save({"config": cfg.to_dict(), "state": base.state_dict()}, workdir / "base.pt")
    return {"params": base.n_params(), "pretrain_loss": loss, "pretrain_s": time.monotonic() - started}


def run_row(row: str, size: str, workdir: Path) -> dict[str, Any]:
    import torch
    from _common import make_data

    from edge_daemon.config import LoraConfigSection, TrainConfig
    from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
    from edge_daemon.plan import TrainingPlan
    from edge_daemon.trainer import (
        BatchMixer,
        RssSampler,
        adapter_bytes,
        block_target_modules,
        evaluate_loss,
        expand_modules,
        release_memory,
        save_peft_adapter,
        update,
    )

    saved = torch.load(workdir / "base.pt")
    base = Forecaster(ForecasterConfig.from_dict(saved["config"]))
    base.load_state_dict(saved["state"])
    base.eval()
    data = make_data(base.cfg.window)
    steps = SIZES[size]["steps"]
    release_memory()
    rss_torch = rss()
    if row in ("serving+peft", "plain PEFT", "update", "update (loose plan)"):
        import bitsandbytes  # noqa: F401  (peft imports it too; explicit so the cost sits in the baseline)
        import peft  # noqa: F401
    release_memory()
    baseline = rss()
    lora_cfg = LoraConfigSection(max_blocks=MAX_BLOCKS)
    train_cfg = TrainConfig(batch_size=BATCH, micro_batch=BATCH, steps=steps, lr=LR_LORA, replay_fraction=0.5)
    out: dict[str, Any] = {"row": row, "rss_torch": rss_torch, "baseline": baseline}

    def mixed_batches() -> BatchMixer:
        return BatchMixer(data["recent_train"], data["replay_train"], BATCH, train_cfg.replay_fraction, torch.Generator().manual_seed(0))

    def val_losses(model: torch.nn.Module) -> dict[str, float | None]:
        return {"recent_val_loss": evaluate_loss(model, data["recent_val"], BATCH), "replay_val_loss": evaluate_loss(model, data["replay_val"], BATCH)}

    def plain_loop(model: torch.nn.Module, lr: float) -> dict[str, Any]:
        """The textbook loop: whole batch, fp32 AdamW, activations kept."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        mixer = mixed_batches()
        before = val_losses(model)
        model.train()
        for _ in range(steps):
            windows, _ = mixer.next_batch()
            loss = forecast_loss(model, windows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)  # same clipping as the update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = val_losses(model)
        return {"before": before, "after": after, "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}

    def work() -> dict[str, Any]:
        if row in ("serving", "serving+peft"):
            # Scoring: the same windows and batch, no autograd.
            with torch.inference_mode():
                for chunk in torch.cat([data["recent_val"], data["replay_val"]]).split(BATCH):
                    base(chunk[:, :-1])
            return {"after": val_losses(base), "trainable": 0, "total": base.n_params()}
        if row == "full fine-tune":
            model = copy.deepcopy(base)
            for p in model.parameters():
                p.requires_grad_(True)
            result = plain_loop(model, LR_FULL)
            result["adapter_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            return result
        if row == "plain PEFT":
            from peft import LoraConfig, get_peft_model

            model = copy.deepcopy(base)
            targets = [n for b in range(base.cfg.n_layers) for n in block_target_modules(model, b, lora_cfg.target_modules)]
            targets += expand_modules(model, lora_cfg.extra_modules)  # the same layers as the update, on every block
            peft_model = get_peft_model(model, LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, target_modules=targets))
            result = plain_loop(peft_model, LR_LORA)
            result["adapter_bytes"] = adapter_bytes(save_peft_adapter(peft_model, workdir / "plain"))
            return result
        assert row.startswith("update")
        plan = TrainingPlan(**(UPDATE_PLAN if row == "update" else LOOSE_PLAN))
        res = update(base, **data, lora_cfg=lora_cfg, train_cfg=train_cfg, plan=plan, seed=0, keep_rejected=True)
        assert res.peft_model is not None
        return {
            "before": res.metrics_before,
            "after": res.metrics_after,
            "trainable": res.trainable_params,
            "total": res.total_params,
            "adapter_bytes": adapter_bytes(save_peft_adapter(res.peft_model, workdir / row.replace(" ", "-"))),
            "accepted": res.accepted,
            "gate": res.reason,
            "chosen_blocks": res.chosen_blocks,
            "optimizer_state": res.optimizer_state,
        }

    gc.collect()
    with RssSampler(0.005) as sampler:
        started = time.monotonic()
        out.update(work())
        out["wall_s"] = time.monotonic() - started
    peak = sampler.result()
    out["peak"] = peak.peak_rss_bytes
    out["ru_maxrss"] = peak.ru_maxrss_bytes
    return out


def run_budget(size: str, workdir: Path, budget_mb: float) -> dict[str, Any]:
    """One update through the project's update path under a memory budget of `budget_mb`.

    The path the training child takes: a watchdog on this process (budget =
    the configured one), dry-run planning of the plan ladder against the
    elevated threshold, then `update` with the governor tightening at every
    micro-batch boundary and stopping at critical. Completed = not stopped.
    """
    import torch
    from _common import make_data

    from edge_daemon.config import LoraConfigSection, MemoryConfig, TrainConfig
    from edge_daemon.errors import TrainingAborted
    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.trainer import release_memory, update
    from edge_daemon.updater import measure_micro_batch_mb
    from edge_daemon.watchdog import MemoryWatchdog, PlanGovernor, choose_start_plan, plan_candidates

    saved = torch.load(workdir / "base.pt")
    base = Forecaster(ForecasterConfig.from_dict(saved["config"]))
    base.load_state_dict(saved["state"])
    base.eval()
    data = make_data(base.cfg.window)
    import bitsandbytes  # noqa: F401  (as in the update rows: peft pulls these in anyway)
    import peft  # noqa: F401

    release_memory()
    memory = MemoryConfig(budget_mb=budget_mb, sample_interval_s=0.02)
    lora_cfg = LoraConfigSection(max_blocks=MAX_BLOCKS)
    train_cfg = TrainConfig(batch_size=BATCH, micro_batch=BATCH, steps=SIZES[size]["steps"], lr=LR_LORA, replay_fraction=0.5)
    out: dict[str, Any] = {"budget_mb": budget_mb}
    with MemoryWatchdog.from_config(memory) as watchdog:
        assert watchdog.budget.source.startswith("config"), watchdog.budget
        time.sleep(0.1)
        out["level_at_start"] = watchdog.level.label
        baseline = watchdog.usage_mb
        governor = PlanGovernor.from_config(memory, watchdog.read_level, plan_candidates(BATCH, BATCH))
        plan = choose_start_plan(
            governor.start_candidates(),
            lambda p: measure_micro_batch_mb(base, data["recent_train"], p, list(lora_cfg.target_modules)),
            baseline_mb=baseline,
            budget_mb=watchdog.budget_mb,
            elevated_fraction=memory.elevated,
        )
        governor.begin_update(plan)
        watchdog.reset_peak()
        started = time.monotonic()
        try:
            res = update(
                base, **data, lora_cfg=lora_cfg, train_cfg=train_cfg, plan=plan,
                plan_source=governor.plan_source, should_stop=governor.should_stop, seed=0,
            )  # fmt: skip
            out["accepted"] = res.accepted
            out["plan_history"] = [change.to_dict() for change in res.plan_history]
        except TrainingAborted as exc:
            out["aborted"] = str(exc)
        out["wall_s"] = time.monotonic() - started
        outcome = governor.outcome()
        out.update(
            baseline=baseline,
            peak_tree_rss=watchdog.peak_rss_mb,
            start_plan=outcome.start_plan.describe(),
            final_plan=outcome.final_plan.describe(),
            worst_level=outcome.worst_level.label,
            completed=not outcome.stopped,
        )
    return out


# --- parent side --------------------------------------------------------------


def child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:7.0f}"


def table(size: str, info: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    torch_only = rows["serving"]["baseline"]
    lines = [
        f"\n## {size}: {info['params']:,} parameters, window {model_config(size).window}, effective batch {BATCH}, "
        f"{SIZES[size]['steps']} steps (base pretrained {SIZES[size]['pretrain']} steps, {info['pretrain_s']:.0f}s); "
        f"update plan: micro-batch {UPDATE_PLAN['micro_batch']} x {UPDATE_PLAN['accumulation']}, checkpointing, "
        f"{UPDATE_PLAN['optimizer']}; LoRA r={lora_rank()} on {MAX_BLOCKS} chosen blocks + {LoraConfigSection().extra_modules} (plain PEFT: all blocks + the same)",
        "",
        "| row | peak RSS MB | baseline MB | increase MB | over torch-only MB | wall s | val loss | trainable % | adapter bytes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ROWS:
        r = rows[name]
        trainable = 100 * r["trainable"] / r["total"] if r["total"] else 0
        lines.append(
            f"| {name} | {mb(r['peak'])} | {mb(r['baseline'])} | {mb(r['peak'] - r['baseline'])} | {mb(r['peak'] - torch_only)} "
            f"| {r['wall_s']:.1f} | {r['after']['recent_val_loss']:.4f} | {trainable:.2f} | {r.get('adapter_bytes', '-')} |"
        )
    serving, serving_peft, plain, upd = rows["serving"], rows["serving+peft"], rows["plain PEFT"], rows["update"]
    inc_plain = plain["peak"] - plain["baseline"]
    inc_update = upd["peak"] - upd["baseline"]
    checks = [
        ("update peak / serving peak (torch only)", upd["peak"] / serving["peak"], 1.2),
        ("update peak / serving peak (peft imported)", upd["peak"] / serving_peft["peak"], 1.2),
        ("update increase / plain PEFT increase", inc_update / inc_plain if inc_plain > 0 else float("nan"), 0.25),
        ("update val loss / plain PEFT val loss", upd["after"]["recent_val_loss"] / plain["after"]["recent_val_loss"], 1.05),
        ("update wall / plain PEFT wall", upd["wall_s"] / plain["wall_s"], 1.5),
    ]
    lines += ["", "| ratio | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for label, value, target in checks:
        lines.append(f"| {label} | {value:.3f} | <= {target} | {'yes' if value <= target else 'NO'} |")
    lines.append(
        f"\nimport cost: torch+model {mb(serving['baseline']).strip()} MB; peft adds "
        f"{mb(serving_peft['baseline'] - serving_peft['rss_torch']).strip()} MB. Update: blocks {upd['chosen_blocks']}, "
        f"optimizer state {upd['optimizer_state']}, gate: {'accepted' if upd['accepted'] else 'rejected'} ({upd['gate']})."
    )
    return "\n".join(lines)


def budget_search(size: str, workdir: Path, serving_peak: int, lo: float = 1.0, hi: float = 2.0, rounds: int = 6) -> list[dict[str, Any]]:
    """Bisect the budget (a multiple of the serving peak) down to the smallest that completes an update.

    `hi` is checked first and doubled until an update completes there; every
    probe is a fresh process, so allocator state never carries over.
    """
    probes: list[dict[str, Any]] = []

    def probe(multiple: float) -> bool:
        r = child(["--budget", str(multiple * serving_peak / 2**20), "--size", size, "--workdir", str(workdir)])
        r["multiple"] = multiple
        probes.append(r)
        print(
            f"[{size}] budget {multiple:.3f}x = {r['budget_mb']:.0f} MB: {'completed' if r['completed'] else 'stopped'} "
            f"({r['start_plan']} -> {r['final_plan']}, worst {r['worst_level']})",
            file=sys.stderr,
        )
        return bool(r["completed"])

    while not probe(hi):
        lo, hi = hi, hi * 2
        if hi > 16:
            return probes
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return probes


def budget_table(size: str, rows: dict[str, dict[str, Any]], probes: list[dict[str, Any]]) -> str:
    serving, serving_peft = rows["serving"]["peak"] / 2**20, rows["serving+peft"]["peak"] / 2**20
    lines = [
        f"\n### {size}: smallest memory budget under which an update completes "
        f"(serving peak {serving:.0f} MB torch only, {serving_peft:.0f} MB with peft imported)",
        "",
        "Each probe is a fresh process running the update path (watchdog with the budget configured, dry-run "
        "planner, governor at every micro-batch boundary; default thresholds 0.70/0.80/0.90). A daemon starts "
        "an update only at level normal: 'level at start' shows whether it would have.",
        "",
        "| budget x serving | x serving+peft | budget MB | level at start | start plan | final plan | worst level | peak tree RSS MB | completed | wall s |",
        "| ---: | ---: | ---: | --- | --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in sorted(probes, key=lambda r: r["multiple"]):
        lines.append(
            f"| {r['multiple']:.3f} | {r['budget_mb'] / serving_peft:.3f} | {r['budget_mb']:.0f} | {r['level_at_start']} "
            f"| {r['start_plan']} | {r['final_plan']} | {r['worst_level']} | {r['peak_tree_rss']:.0f} "
            f"| {'yes' if r['completed'] else 'no (stopped at critical)'} | {r['wall_s']:.1f} |"
        )
    done = [r for r in probes if r["completed"]]
    if done:
        best = min(done, key=lambda r: r["multiple"])
        normal = [r for r in done if r["level_at_start"] == "normal"]
        lines.append(
            f"\nsmallest completing budget: {best['multiple']:.3f}x serving ({best['budget_mb'] / serving_peft:.3f}x serving+peft), "
            f"plan {best['start_plan']} -> {best['final_plan']}; target <= 1.15x serving: {'met' if best['multiple'] <= 1.15 else 'NOT met'}."
        )
        if normal:
            first = min(normal, key=lambda r: r["multiple"])
            lines.append(f"smallest completing budget that a daemon would also start (level normal): {first['multiple']:.3f}x serving.")
    else:
        lines.append("\nno probed budget completed an update.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["default", "large", "both"], default="both")
    parser.add_argument("--json", type=Path, help="also write every row's raw numbers here")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--no-budget", action="store_true", help="skip the smallest-budget search")
    args = parser.parse_args()

    if args.budget is not None:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(run_budget(args.size, args.workdir, args.budget)))
        return
    if args.prepare or args.row:  # child process: one measurement, one JSON line
        import torch

        torch.set_num_threads(1)
        result = prepare(args.size, args.workdir) if args.prepare else run_row(args.row, args.size, args.workdir)
        print(json.dumps(result))
        return

    raw: dict[str, Any] = {}
    for size in ("default", "large") if args.size == "both" else (args.size,):
        with tempfile.TemporaryDirectory(prefix="edge-mem-") as tmp:
            info = child(["--prepare", "--size", size, "--workdir", tmp])
            rows = {}
            for row in ROWS:
                rows[row] = child(["--row", row, "--size", size, "--workdir", tmp])
                print(f"[{size}] {row}: peak {rows[row]['peak'] / 2**20:.0f} MB, {rows[row]['wall_s']:.1f}s", file=sys.stderr)
            raw[size] = {"info": info, "rows": rows}
            print(table(size, info, rows), flush=True)
            if size == "default" and not args.no_budget:
                probes = budget_search(size, Path(tmp), rows["serving"]["peak"])
                raw[size]["budget_probes"] = probes
                print(budget_table(size, rows, probes), flush=True)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
