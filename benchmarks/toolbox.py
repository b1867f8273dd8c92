"""What each low-memory technique saves in one training pass, as the kernel charges it.

    python benchmarks/toolbox.py                  # both tables (needs root for the cgroups; ~3 min)
    python benchmarks/toolbox.py --only reversible
    python benchmarks/toolbox.py --only step-in-backward
    python benchmarks/toolbox.py --only forward-only
    python benchmarks/toolbox.py --only in-service

Every configuration runs in a fresh interpreter in a memory cgroup of its own (v1 or v2), with a
training worker's malloc settings (freed blocks from 128 kB go back to the kernel at once) and one
thread. After a warm-up pass on another batch (torch's one-off set-up is not the technique's),
the cgroup's high-water mark is reset and one more pass runs; "charged" is the high-water mark
over the charge before that pass. Beside it: the kernel's peak RSS of the process over its RSS
before (VmHWM), and the bytes autograd keeps between forward and backward (saved-tensor hooks,
each storage once, weights not counted).

reversible: one LoRA training forward+backward (r 4 on qkv, proj, fc1 and fc2 of blocks 0 and 1,
the worst case: backward runs through every block) at 3, 6 and 12 blocks of the default width,
micro-batch 32, standard blocks, standard with gradient checkpointing, reversible blocks; and the
fastest of 20 passes of each, the three interleaved in one process.

step-in-backward: one optimizer step (forward, backward, AdamW) of the default and the large
model, as a LoRA update trains (the default adapter on 2 blocks) and fully fine-tuned (also with
the tightest plan's activations: one window, checkpointed), with the
ordinary step (a full set of gradients, then the step) and with the step in backward (each
gradient stepped and freed as backward makes it). The warm-up pass makes the Adam state, so the
measured step holds it already, as every step after an update's first does.

forward-only: on the default and the large model with the default adapter (micro-batch 32 and 8),
a scoring pass (inference mode), one forward-only step (two forwards along a random direction and
the move along it) and one backward of the same windows.

in-service: forward-only steps on a thread of their own after scoring passes on the main thread,
as an update that starts forward-only runs in the daemon, with glibc's malloc defaults and with
the daemon's settings, at each micro-batch from 32 to 1: the charge and the time a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEPTHS = (3, 6, 12)
MODES = ("standard", "checkpointing", "reversible")
BATCH, WINDOW, D_MODEL, D_FF, CHANNELS = 32, 64, 64, 128, 4
TARGETS = ("attn.qkv", "attn.proj", "fc1", "fc2")
REPEATS = 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _own_cgroup() -> Path | None:
    """This process's memory cgroup directory (v1 memory controller, or v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hier, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


class Meter:
    """The measured pass: the cgroup's high-water mark and the process's VmHWM over what was there before."""

    def __enter__(self) -> Meter:
        gc.collect()
        self.cgroup = _own_cgroup()
        self.v1 = self.cgroup is not None and (self.cgroup / "memory.max_usage_in_bytes").exists()
        if self.v1:
            (self.cgroup / "memory.max_usage_in_bytes").write_text("0")
            self.before_cg = int((self.cgroup / "memory.usage_in_bytes").read_text())
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.before_rss = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mb = (_status_kb("VmHWM") - self.before_rss) / 1024
        self.charged_mb = None
        if self.v1:
            self.charged_mb = (int((self.cgroup / "memory.max_usage_in_bytes").read_text()) - self.before_cg) / 2**20


def _worker_malloc() -> None:
    from edge_daemon.memory.usage import tight_malloc

    tight_malloc()  # as the daemon and its workers set it


def _batches(length: int, n: int = BATCH):  # -> (warm-up batch, measured batch)
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(n, length + 1, CHANNELS, generator=g), torch.randn(n, length + 1, CHANNELS, generator=g)


def build_reversible(mode: str, depth: int):
    import torch

    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.lora import attach_lora

    torch.manual_seed(0)  # the same weights in every mode
    cfg = ForecasterConfig(n_channels=CHANNELS, window=WINDOW, d_model=D_MODEL, d_ff=D_FF, n_layers=depth, reversible=mode == "reversible")
    model = Forecaster(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a trained head passes the blocks a gradient
    attach_lora(model, [f"blocks.{b}.{t}" for b in (0, 1) for t in TARGETS], r=4, alpha=8.0)
    model.gradient_checkpointing = mode == "checkpointing"
    return model.train()


def child_reversible(mode: str, depth: int) -> dict[str, float | None]:
    _worker_malloc()
    import torch

    from edge_daemon.model import forecast_loss

    torch.set_num_threads(1)
    model = build_reversible(mode, depth)
    warm, batch = _batches(WINDOW)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (ptr := t.untyped_storage().data_ptr()) not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forecast_loss(model, warm)
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    with Meter() as meter:
        forecast_loss(model, batch).backward()
    return {"saved_mb": sum(kept.values()) / 2**20, "charged_mb": meter.charged_mb, "rss_mb": meter.rss_mb}


def child_timing(depth: int) -> dict[str, float]:
    """Fastest forward+backward of each mode, passes interleaved: a busy machine slows all alike."""
    import torch

    from edge_daemon.model import forecast_loss

    torch.set_num_threads(1)
    models = {mode: build_reversible(mode, depth) for mode in MODES}
    warm, batch = _batches(WINDOW)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(REPEATS + 1):
        for mode, model in models.items():
            started = time.perf_counter()
            forecast_loss(model, warm if round_ == 0 else batch).backward()
            if round_:
                times[mode].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    return {mode: 1000 * min(t) for mode, t in times.items()}


def child_step(size: str, what: str, fused: bool) -> dict[str, float | None]:
    _worker_malloc()
    import torch

    from edge_daemon.model import LARGE, Forecaster, ForecasterConfig, forecast_loss
    from edge_daemon.training.loop import StepInBackward
    from edge_daemon.training.lora import attach_lora
    from edge_daemon.training.optimizer import AdamW

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = dict(LARGE) if size == "large" else {}
    model = Forecaster(ForecasterConfig(n_channels=CHANNELS, **shape))
    if what == "lora":
        attach_lora(model, [f"blocks.{b}.{t}" for b in (0, 1) for t in TARGETS], r=4, alpha=8.0)
    micro = 8 if size == "large" else BATCH
    if what == "full-tight":  # the tightest plan's activations: one window, checkpointed
        model.gradient_checkpointing, micro = True, 1
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=1e-4)
    hooks = StepInBackward(params, optimizer, float("inf")) if fused else None
    warm, batch = _batches(model.cfg.window, micro)

    def step(x: torch.Tensor) -> None:
        forecast_loss(model, x).backward()
        if hooks is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(warm)
    with Meter() as meter:
        step(batch)
    grads_mb = sum(p.numel() * 4 for p in params) / 2**20
    return {"charged_mb": meter.charged_mb, "rss_mb": meter.rss_mb, "trainable": sum(p.numel() for p in params), "gradients_mb": grads_mb}


def child_forward(size: str, kind: str) -> dict[str, float | None]:
    _worker_malloc()
    import torch

    from edge_daemon.model import LARGE, Forecaster, ForecasterConfig, forecast_loss
    from edge_daemon.training.forward_only import forward_only_step
    from edge_daemon.training.lora import attach_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=CHANNELS, **(dict(LARGE) if size == "large" else {})))
    attach_lora(model, [f"blocks.{b}.{t}" for b in (0, 1) for t in TARGETS], r=4, alpha=8.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    micro = 8 if size == "large" else BATCH
    warm, batch = _batches(model.cfg.window, micro)

    def run(x: torch.Tensor) -> None:
        if kind == "scoring":
            with torch.inference_mode():
                forecast_loss(model, x)
        elif kind == "forward-only":
            forward_only_step(model, params, x, micro, lr=1.0, eps=1e-3, seed=1)
        else:
            forecast_loss(model, x).backward()
            model.zero_grad(set_to_none=True)

    run(warm)
    with Meter() as meter:
        run(batch)
    return {"charged_mb": meter.charged_mb, "rss_mb": meter.rss_mb}


IN_SERVICE_STEPS = 40
IN_SERVICE_MICRO = (32, 16, 8, 4, 1)


def child_in_service(malloc: str, micro: int) -> dict[str, float | None]:
    """Forward-only steps on a thread of their own, as an update in the daemon runs them, after
    scoring passes on the main thread: the cgroup's high-water mark over the steps, and the time a
    step (a batch of 32 windows in micro-batches of `micro`). `malloc`: "daemon" (the daemon's
    settings) or "glibc" (its defaults)."""
    if malloc == "daemon":
        _worker_malloc()
    import threading
    import time

    import torch

    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.forward_only import forward_only_step
    from edge_daemon.training.lora import attach_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=CHANNELS))
    with torch.inference_mode():
        for _ in range(20):
            model(torch.randn(1, model.cfg.window, CHANNELS))
    attach_lora(model, [f"blocks.{b}.{t}" for b in (0, 1) for t in TARGETS], r=4, alpha=8.0)
    params = [p for p in model.parameters() if p.requires_grad]
    _warm, batch = _batches(model.cfg.window)
    took: list[float] = []

    def steps() -> None:
        started = time.perf_counter()
        for k in range(IN_SERVICE_STEPS):
            forward_only_step(model, params, batch, micro, lr=1.0, eps=1e-3, seed=k)
        took.append((time.perf_counter() - started) / IN_SERVICE_STEPS)

    with Meter() as meter:
        thread = threading.Thread(target=steps)
        thread.start()
        thread.join()
    return {"charged_mb": meter.charged_mb, "rss_mb": meter.rss_mb, "ms_per_step": 1000 * took[0]}


def in_service_table() -> list[str]:
    lines = [
        f"{IN_SERVICE_STEPS} forward-only steps of 32 windows on a thread of their own, default model and adapter, 1 thread",
        "",
        "| malloc | micro-batch | charged MB (cgroup) | peak RSS MB | ms a step |",
        "| --- | --: | --: | --: | --: |",
    ]
    for malloc in ("glibc", "daemon"):
        for micro in IN_SERVICE_MICRO:
            r = _in_cgroup(["--child-in-service", malloc, str(micro)])
            label = "glibc's defaults" if malloc == "glibc" else "the daemon's (tight_malloc)"
            lines.append(f"| {label} | {micro} | {_mb(r['charged_mb'])} | {r['rss_mb']:.1f} | {r['ms_per_step']:.1f} |")
    return lines


def forward_table() -> list[str]:
    lines = [
        "The default adapter (2 blocks), micro-batch 32 on the default model, 8 on the large one, 1 thread",
        "",
        "| model | pass | charged MB (cgroup) | peak RSS MB |",
        "| --- | --- | --: | --: |",
    ]
    for size in ("default", "large"):
        for kind in ("scoring", "forward-only", "backward"):
            r = _in_cgroup(["--child-forward", size, kind])
            label = {"scoring": "scoring pass", "forward-only": "forward-only step", "backward": "forward and backward"}[kind]
            lines.append(f"| {size} | {label} | {_mb(r['charged_mb'])} | {r['rss_mb']:.1f} |")
    return lines


def _in_cgroup(args: list[str]) -> dict:
    """Run this script with `args` in a fresh memory cgroup (where one can be made) and read its JSON line."""
    sys.path.insert(0, str(ROOT))
    from tests.cgroups import MemoryCgroup, create_memory_cgroup

    cgroup = create_memory_cgroup()
    preexec = cgroup.enter_fn() if isinstance(cgroup, MemoryCgroup) else None
    try:
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, preexec_fn=preexec, cwd=ROOT)
    finally:
        if isinstance(cgroup, MemoryCgroup):
            cgroup.remove(30)
    return json.loads(out.stdout.splitlines()[-1])


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def reversible_table() -> list[str]:
    lines = [
        f"LoRA r 4 on blocks 0 and 1 (qkv, proj, fc1, fc2), micro-batch {BATCH}, window {WINDOW}, d_model {D_MODEL}, d_ff {D_FF}, {CHANNELS} channels, 1 thread",
        "",
        "| blocks | blocks as | kept for backward MB | charged MB (cgroup) | peak RSS MB | ms a pass (fastest) | time / standard |",
        "| --: | --- | --: | --: | --: | --: | --: |",
    ]
    kept: dict[tuple[str, int], float] = {}
    for depth in DEPTHS:
        ms = _in_cgroup(["--child-timing", str(depth)])
        for mode in MODES:
            r = _in_cgroup(["--child-reversible", mode, str(depth)])
            kept[(mode, depth)] = r["saved_mb"]
            lines.append(f"| {depth} | {mode} | {r['saved_mb']:.2f} | {_mb(r['charged_mb'])} | {r['rss_mb']:.1f} | {ms[mode]:.1f} | {ms[mode] / ms['standard']:.2f} |")
    lines.append("")
    for mode in MODES:
        lines.append(f"{mode}: kept for backward at 12 blocks / at 3: {kept[(mode, 12)] / kept[(mode, 3)]:.2f}x")
    return lines


def step_table() -> list[str]:
    lines = [
        "One optimizer step after the first (micro-batch 32 on the default model, 8 on the large one), 1 thread",
        "",
        "| model | what trains | trainable parameters | a full set of gradients MB | step | charged MB (cgroup) | peak RSS MB |",
        "| --- | --- | --: | --: | --- | --: | --: |",
    ]
    for size in ("default", "large"):
        for what in ("lora", "full", "full-tight"):
            for fused in (False, True):
                r = _in_cgroup(["--child-step", size, what, "1" if fused else "0"])
                label = {"lora": "LoRA, default (2 blocks)", "full": "full fine-tune", "full-tight": "full fine-tune, micro-batch 1, checkpointing"}[what]
                lines.append(
                    f"| {size} | {label} | {r['trainable']:,} | {r['gradients_mb']:.2f} | {'in backward' if fused else 'ordinary'} "
                    f"| {_mb(r['charged_mb'])} | {r['rss_mb']:.1f} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["reversible", "step-in-backward", "forward-only", "in-service"])
    parser.add_argument("--child-in-service", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-forward", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-reversible", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-timing", help=argparse.SUPPRESS)
    parser.add_argument("--child-step", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_reversible:
        print(json.dumps(child_reversible(args.child_reversible[0], int(args.child_reversible[1]))))
        return
    if args.child_timing:
        print(json.dumps(child_timing(int(args.child_timing))))
        return
    if args.child_in_service:
        print(json.dumps(child_in_service(args.child_in_service[0], int(args.child_in_service[1]))))
        return
    if args.child_forward:
        print(json.dumps(child_forward(*args.child_forward)))
        return
    if args.child_step:
        size, what, fused = args.child_step
        print(json.dumps(child_step(size, what, fused == "1")))
        return
    if os.geteuid() != 0:
        print("not root: no cgroup of its own per configuration; 'charged' stays empty", file=sys.stderr)
    if args.only in (None, "reversible"):
        print("\n".join(reversible_table()) + "\n")
    if args.only in (None, "step-in-backward"):
        print("\n".join(step_table()) + "\n")
    if args.only in (None, "forward-only"):
        print("\n".join(forward_table()) + "\n")
    if args.only in (None, "in-service"):
        print("\n".join(in_service_table()))


if __name__ == "__main__":
    main()
