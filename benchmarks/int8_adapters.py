"""int8 adapters: file size, and held-out loss of fake-quantised training against float32 training
and naive post-training quantisation, after a regime change.

A base learns the old regime; one update (project defaults: `loop.update`, 2 blocks' target
modules plus the heads and linear paths, 60 steps) adapts it to the new one, once in float32 and
once with fake quantisation (`[lora] save = "int8"`). Each adapter is saved, read back and merged
into the base the way serving does it, and scored on the held-out new-regime windows
(`recent_val`, the gate's `forecast_loss`), beside persistence and the ridge autoregression fitted
on the update's windows, on the same windows and loss. "naive PTQ" is the float32 adapter quantised at save.
The scale granularity is compared too: per tensor, per rank component (the file format) and per
row of lora_B (per row of lora_A = per rank component), each trained with fake quantisation and
applied after training (on the large model only after training: its updates take minutes each).

    python benchmarks/int8_adapters.py [--seeds 3] [--models default large] [--steps 60]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from _common import OLD, baseline_models, make_data, pretrain, regime_windows

from edge_daemon.artifacts.adapters import load_lora_state
from edge_daemon.artifacts.merge import merge_lora
from edge_daemon.artifacts.peft_format import ADAPTER_INT8_WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE
from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.model import LARGE, Forecaster, ForecasterConfig
from edge_daemon.training import lora as lora_module
from edge_daemon.training.gate import evaluate_loss
from edge_daemon.training.loop import update
from edge_daemon.training.lora import adapter_config, save_adapter
from edge_daemon.training.plan import plan_from_config

MODELS = {"default": {"window": 64}, "large": dict(LARGE)}
# Base training (steps, batch): the large model's full step takes ~4.5 s on one core at batch 32.
PRETRAIN = {"default": (600, 32), "large": (150, 16)}
GRANULARITIES = ("tensor", "rank", "row")  # scales: one per tensor; per rank component; per row of B (per rank of A)


def fake_quant(weight: torch.Tensor, rank_dim: int, granularity: str) -> torch.Tensor:
    """Symmetric int8 round trip of a LoRA weight (rank_dim 0: lora_A (r, in); 1: lora_B (out, r))."""
    w = weight.detach().float()
    if granularity == "tensor":
        amax = w.abs().amax().expand(w.shape)
    elif granularity == "rank" or rank_dim == 0:
        amax = w.abs().amax(dim=1 - rank_dim, keepdim=True).expand(w.shape)
    else:  # per row of lora_B: one scale per output feature
        amax = w.abs().amax(dim=1, keepdim=True).expand(w.shape)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(w / scale).clamp(-127, 127) * scale


def n_scales(shape: torch.Size, rank_dim: int, granularity: str) -> int:
    if granularity == "tensor":
        return 1
    if granularity == "rank" or rank_dim == 0:
        return shape[rank_dim]
    return shape[0]


def base_for(model: str, seed: int, pretrain_steps: int, batch: int) -> Forecaster:
    shape = MODELS[model]
    torch.manual_seed(seed)
    # The daemon's default forecast: the next step and one hour's worth, capped at half a window.
    base = Forecaster(ForecasterConfig(n_channels=3, horizons=(1, shape["window"] // 2), **shape))
    pretrain(base, regime_windows(OLD, 1024, shape["window"] + 1, seed=1000 + seed), pretrain_steps, batch=batch, seed=seed)
    return base


def served_loss(base: Forecaster, directory: Path, windows: torch.Tensor) -> float:
    """What serving does with a saved adapter (read its weights, merge), then the held-out loss."""
    tensors, cfg = load_lora_state(directory)
    loss = evaluate_loss(merge_lora(base, tensors, cfg), windows)
    assert loss is not None
    return loss


def merged_loss(base: Forecaster, adapted: torch.nn.Module, granularity: str, windows: torch.Tensor) -> tuple[float, float]:
    """The float32 adapter quantised after training at `granularity`, merged; its held-out loss and
    the relative error it makes in the LoRA delta B @ A (mean over modules)."""
    tensors, errors = {}, []
    for name, layer in lora_module.lora_layers(adapted).items():
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        qa, qb = fake_quant(a, 0, granularity), fake_quant(b, 1, granularity)
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = qa, qb
        exact = b @ a
        errors.append(float((qb @ qa - exact).norm() / exact.norm().clamp_min(1e-12)))
    loss = evaluate_loss(merge_lora(base, tensors, adapter_config(adapted)), windows)
    assert loss is not None
    return loss, statistics.fmean(errors)


@contextlib.contextmanager
def quantiser(granularity: str) -> Iterator[None]:
    """The fake-quantised forward with `granularity`'s scales (the trainer's own is "rank")."""
    original = lora_module._fake_quant
    if granularity != "rank":
        lora_module._fake_quant = lambda w, d: fake_quant(w, d, granularity).to(w.dtype) + (w - w.detach())  # type: ignore[assignment]
    try:
        yield
    finally:
        lora_module._fake_quant = original


def train(base: Forecaster, data: dict[str, torch.Tensor], save: str, steps: int, seed: int) -> Any:
    lora_cfg = LoraConfigSection(save=save)  # type: ignore[arg-type]
    train_cfg = TrainConfig(steps=steps)
    result = update(base, **data, lora_cfg=lora_cfg, train_cfg=train_cfg, plan=plan_from_config(train_cfg), seed=seed, keep_rejected=True)
    assert result.adapted is not None
    return result


def run_seed(model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    steps, batch = PRETRAIN[model]
    base = base_for(model, seed, args.pretrain_steps or steps, batch)
    data = make_data(MODELS[model]["window"], seed=10 * seed)
    val = data["recent_val"]
    out: dict[str, Any] = {"seed": seed, "base": evaluate_loss(base, val)}
    for name, model in baseline_models(base.cfg, data["recent_train"]).items():
        out[name] = evaluate_loss(model, val)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = train(base, data, "fp32", args.steps, seed)
        save_adapter(fp32.adapted, Path(tmp) / "fp32", "fp32")
        save_adapter(fp32.adapted, Path(tmp) / "ptq", "int8")  # naive: quantised at save
        out["fp32"] = served_loss(base, Path(tmp) / "fp32", val)
        out["ptq"] = served_loss(base, Path(tmp) / "ptq", val)
        qat = train(base, data, "int8", args.steps, seed)
        save_adapter(qat.adapted, Path(tmp) / "int8", "int8")
        out["int8"] = served_loss(base, Path(tmp) / "int8", val)
        # Serving's merge of the saved int8 file scores what the fake-quantised model scored in training.
        out["int8_in_training"] = qat.metrics_after["recent_val_loss"]
        out["fp32_bytes"] = (Path(tmp) / "fp32" / ADAPTER_WEIGHTS_FILE).stat().st_size
        out["int8_bytes"] = (Path(tmp) / "int8" / ADAPTER_INT8_WEIGHTS_FILE).stat().st_size
        out["trainable"] = fp32.trainable_params
        out["modules"] = len(fp32.target_modules)
        out["accepted"] = (fp32.accepted, qat.accepted)
        layers = lora_module.lora_layers(fp32.adapted)
        rank_scales = sum(n_scales(layer.lora_A.weight.shape, 0, "rank") + n_scales(layer.lora_B.weight.shape, 1, "rank") for layer in layers.values())
        for granularity in GRANULARITIES:
            out[f"ptq_{granularity}"], out[f"delta_err_{granularity}"] = merged_loss(base, fp32.adapted, granularity, val)
            scales = sum(n_scales(layer.lora_A.weight.shape, 0, granularity) + n_scales(layer.lora_B.weight.shape, 1, granularity) for layer in layers.values())
            # The file's size with this many float32 scales (the header differs by a few digits).
            out[f"bytes_{granularity}"] = out["int8_bytes"] + 4 * (scales - rank_scales)
            if granularity == "rank":
                out[f"qat_{granularity}"] = out["int8"]
            elif model == "large":
                out[f"qat_{granularity}"] = float("nan")
            else:
                with quantiser(granularity):
                    out[f"qat_{granularity}"] = evaluate_loss(train(base, data, "int8", args.steps, seed).adapted, val)
    out["seconds"] = time.monotonic() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["default", "large"])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="base training steps (0: 600 default, 150 large)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        print(f"\n## {model} model {MODELS[model]}, r {LoraConfigSection().r}\n")
        print("| seed | persistence | ridge | base | fp32 | int8 (fake-quant, served) | int8 in training | naive PTQ int8 | int8 vs fp32 | PTQ vs fp32 | accepted fp32/int8 | s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |", flush=True)
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_seed(model, seed, args)
            runs.append(r)
            print(
                f"| {r['seed']} | {r['persistence']:.5f} | {r['ridge']:.5f} | {r['base']:.5f} | {r['fp32']:.5f} | {r['int8']:.5f} | {r['int8_in_training']:.5f} | {r['ptq']:.5f} | "
                f"{r['int8'] / r['fp32'] - 1:+.3%} | {r['ptq'] / r['fp32'] - 1:+.3%} | {r['accepted']} | {r['seconds']:.0f} |",
                flush=True,
            )
        r0 = runs[0]
        mean = {k: statistics.fmean(r[k] for r in runs) for k in ("persistence", "ridge", "fp32", "int8", "ptq")}
        print(f"| mean | {mean['persistence']:.5f} | {mean['ridge']:.5f} | | {mean['fp32']:.5f} | {mean['int8']:.5f} | | {mean['ptq']:.5f} | {mean['int8'] / mean['fp32'] - 1:+.3%} | {mean['ptq'] / mean['fp32'] - 1:+.3%} | | |")
        print(f"\n{r0['modules']} adapted modules, {r0['trainable']} LoRA weights; weights file: fp32 {r0['fp32_bytes']} B, "
              f"int8 {r0['int8_bytes']} B, {r0['fp32_bytes'] / r0['int8_bytes']:.2f}x smaller")
        print("\nscale granularity (mean over seeds; loss relative to the fp32 adapter):\n")
        print("| scales | int8 file bytes | fake-quant trained | quantised after training | delta rel. error after training |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for g in GRANULARITIES:
            qat = statistics.fmean(r[f"qat_{g}"] / r["fp32"] - 1 for r in runs)
            ptq = statistics.fmean(r[f"ptq_{g}"] / r["fp32"] - 1 for r in runs)
            err = statistics.fmean(r[f"delta_err_{g}"] for r in runs)
            print(f"| {g} | {r0[f'bytes_{g}']} | {qat:+.3%} | {ptq:+.3%} | {err:.2e} |")


if __name__ == "__main__":
    main()
