"""Memory benchmark: what a device pays for the whole service, serving and during an update.

Every row runs the real daemon (`python -m edge_daemon run`) in a fresh memory
cgroup of its own, with live readings arriving over MQTT once a second, a
replay store holding hours of history and a base model; then asks it for an
update over the control socket, as an operator would. Memory is what the
kernel charges the cgroup (usage less inactive page cache, which is reclaimed
before any OOM kill), sampled every 50 ms: the daemon, its training helper and
the worker together. The tree's PSS and its summed RSS are printed beside it.

    python benchmarks/memory.py                        # default and large model, then the limit search
    python benchmarks/memory.py --size default --no-search
    python benchmarks/memory.py --checkout ../old-main # the same rows for another checkout's daemon
    python benchmarks/memory.py --idle-minutes 30 --checkout ../old-main  # idle, side by side
    python benchmarks/memory.py --operator-stack      # idle with ON_SECTIONS ([metrics] and [homeassistant] discovery) vs without
    python benchmarks/memory.py --techniques --no-search  # an update with each low-memory technique alone, and the planner's choice
    python benchmarks/memory.py --techniques --technique forward-only --size default --no-search  # one row
    python benchmarks/memory.py --search-only --search-rung both  # the limit search with and without the forward-only rung

The limit search runs the default model under real cgroup limits, as multiples
of its serving charge, and bisects the smallest under which the daemon, by its
own start rule, completes a requested update (no OOM kill, ingestion storing
throughout). Needs root (cgroups); Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from edge_daemon.broker import LocalBroker  # noqa: E402
from edge_daemon.config import parse_config  # noqa: E402
from edge_daemon.control.client import request  # noqa: E402
from edge_daemon.frames import build_grid  # noqa: E402
from edge_daemon.model import LARGE  # noqa: E402
from edge_daemon.training.pretrain import pretrain  # noqa: E402
from edge_daemon.store import Reading, ReplayStore  # noqa: E402
from edge_daemon.memory.usage import _pss_bytes, private_mb  # noqa: E402
from sample_sensors.generate import CHANNELS, generate_labeled, readings  # noqa: E402
from sample_sensors.publish import publish  # noqa: E402
from tests.cgroups import MemoryCgroup, create_memory_cgroup  # noqa: E402
from tests.support import config_toml, daemon_status, wait_for  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {"default": {}, "large": dict(LARGE)}
PRETRAIN_STEPS = {"default": 300, "large": 20}  # the base has only to exist and be sensible
HISTORY_H = 3.0  # hours of 1 s readings in the store before the daemon starts
SETTLE_SCORED = 20  # live steps scored before serving is measured
SERVING_S = 20.0  # serving is the median charge over this long
SAMPLE_S = 0.05
HANG_S = 900.0  # bounds a hang only; every wait is for an event
HELD_S = 90.0
# Only the benchmark's request starts an update, at once.
TRAIN: dict[str, Any] = {"start_on": ["request"], "idle_cpu_percent": 100, "idle_window_s": 1, "check_interval_s": 0.5, "min_interval_s": 0}
UNLIMITED_MB = 16 * 1024  # the cgroup's limit for rows without one: far above anything measured  # a request still not started after this long under a limit counts as held back


@dataclass
class Row:
    label: str
    size: str
    limit_multiple: float | None = None
    limit_mb: float | None = None
    serving_mb: float = 0.0  # median cgroup charge while serving
    serving_pss_mb: float = 0.0
    serving_rss_sum_mb: float = 0.0
    update_peak_mb: float | None = None  # max sampled cgroup charge from the request to the result
    kernel_peak_mb: float | None = None  # the cgroup's own high-water mark (page cache included)
    watchdog_peak_mb: float | None = None  # the daemon's own reading at its peak
    outcome: str = ""
    wall_s: float | None = None
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    accepted: bool | None = None
    oom_kills: int = 0
    stored_during_update: int = 0
    daemon_alive: bool = True
    worker_imports: list[str] | None = None
    new_modules: list[str] | None = None  # modules the worker imported that the helper had not
    plans: list[str] = field(default_factory=list)
    adapter_bytes: int | None = None  # the accepted adapter's files
    techniques: list[str] | None = None  # what the update says it ran
    phases: list[dict[str, Any]] = field(default_factory=list)  # per phase of the worker: its private MB, the service's

    @property
    def ratio(self) -> float | None:
        return self.update_peak_mb / self.serving_mb if self.update_peak_mb and self.serving_mb else None


def _pss_mb(pids: list[int]) -> float:
    return sum(_pss_bytes(pid) or 0 for pid in pids) / 2**20


def _rss_sum_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 2**20


def prepare_state(workdir: Path, size: str, port: int, extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Config (with `extra` sections), a store with HISTORY_H hours of readings, and a base model;
    returns the config file."""
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": f"bench-{size}", "state_dir": str(workdir / "state"), "socket": str(workdir / "control.sock")},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "channels": {"names": list(CHANNELS), "period_s": 1.0},
        "model": MODELS[size],
        "train": dict(TRAIN),
        "memory": {"sample_interval_s": SAMPLE_S},
    }
    for name, values in (extra or {}).items():
        sections[name] = {**sections.get(name, {}), **values}
    config_file = workdir / "config.toml"
    config_file.write_text(config_toml(sections))
    cfg = parse_config({k: v for k, v in sections.items()})
    steps = int(HISTORY_H * 3600)
    start_ts = float(int(time.time()) - steps - 5)
    data = generate_labeled(steps, start_ts=start_ts, seed=7, time_scale=24)
    ts, idx, values = readings(data, 0, steps)
    with ReplayStore(cfg.store_path, cfg.store, list(CHANNELS)) as store:
        batch = [Reading(CHANNELS[int(i)], float(t), float(v)) for t, i, v in zip(ts, idx, values, strict=True)]
        for start in range(0, len(batch), 20_000):
            store.write(batch[start : start + 20_000])
    grid = build_grid(ts, idx, values, len(CHANNELS), 1.0, 5)
    pretrain(grid, list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=PRETRAIN_STEPS[size])
    return config_file


class LiveFeed:
    """Readings once a second over MQTT, stamped with the wall clock, from a thread."""

    def __init__(self, port: int) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=publish, kwargs={"port": port, "steps": 10**6, "speedup": 1.0, "start_ts": float(int(time.time())), "seed": 11, "stop": self.stop},
            name="live-feed", daemon=True,
        )  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def _revision(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)


@dataclass
class Service:
    """A daemon serving in a memory cgroup of its own, fed live readings."""

    daemon: subprocess.Popen[bytes]
    cgroup: MemoryCgroup
    socket_path: Path
    workdir: Path

    def alive_status(self) -> dict[str, Any] | None:
        if self.daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.daemon.returncode}):\n{(self.workdir / 'daemon.log').read_text()[-3000:]}")
        return daemon_status(self.socket_path)


@contextlib.contextmanager
def serving(size: str, checkout: Path, extra: dict[str, dict[str, Any]] | None = None) -> Iterator[tuple[Service, int]]:
    """The daemon of `checkout` in a fresh cgroup (no limit yet) with a store, a base and live
    readings, once it has scored its first live step (yielded with that step count); stopped,
    and everything removed, after."""
    with tempfile.TemporaryDirectory(prefix="edge-mem-") as tmp:
        workdir = Path(tmp)
        (workdir / "broker").mkdir()
        broker = LocalBroker(workdir=workdir / "broker")
        broker.start()
        cgroup = create_memory_cgroup()
        if not isinstance(cgroup, MemoryCgroup):
            raise SystemExit(f"cannot create a memory cgroup here: {cgroup}")
        cgroup.set_limit_mb(UNLIMITED_MB)  # a row without a limit measures what the service takes
        feed: LiveFeed | None = None
        daemon: subprocess.Popen[bytes] | None = None
        try:
            config_file = prepare_state(workdir, size, broker.port, extra)
            with open(workdir / "daemon.log", "wb") as log:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "edge_daemon", "run", "--config", str(config_file)],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=cgroup.enter_fn(), cwd=checkout,
                    env=dict(os.environ, PYTHONPATH=str(checkout)),
                )  # fmt: skip
            service = Service(daemon, cgroup, workdir / "control.sock", workdir)
            wait_for(service.alive_status, HANG_S, "the control socket", interval=0.1)
            feed = LiveFeed(broker.port)
            first = wait_for(lambda: ((service.alive_status() or {}).get("scoring") or {}).get("steps"), HANG_S, "the first live step scored", interval=0.1)
            yield service, int(first)
        finally:
            if feed is not None:
                feed.close()
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            if daemon is not None and daemon.returncode not in (0, None) and os.environ.get("EDGE_BENCH_LOG"):
                print((workdir / "daemon.log").read_text()[-4000:], file=sys.stderr)
            cgroup.remove(60)
            broker.stop()


def run_row(label: str, size: str, checkout: Path, limit_multiple: float | None = None, extra: dict[str, dict[str, Any]] | None = None) -> Row:
    row = Row(label, size, limit_multiple)
    with serving(size, checkout, extra) as (service, first):
        daemon, cgroup, socket_path, workdir, alive_status = service.daemon, service.cgroup, service.socket_path, service.workdir, service.alive_status
        wait_for(lambda: ((alive_status() or {}).get("scoring") or {}).get("steps", 0) >= first + SETTLE_SCORED, HANG_S, "live scoring to settle", interval=0.1)
        charges = []
        deadline = time.monotonic() + SERVING_S
        while time.monotonic() < deadline:
            charges.append(cgroup.charge_mb())
            time.sleep(SAMPLE_S)
        row.serving_mb = sorted(charges)[len(charges) // 2]
        pids = cgroup.pids()
        row.serving_pss_mb, row.serving_rss_sum_mb = _pss_mb(pids), _rss_sum_mb(pids)
        if limit_multiple is not None:
            row.limit_mb = limit_multiple * row.serving_mb
            cgroup.set_limit_mb(row.limit_mb)
            wait_for(lambda: abs(((alive_status() or {}).get("memory") or {}).get("budget_mb", 0) - row.limit_mb) < 1, HANG_S, "the limit as budget", interval=0.1)
        stored_before = (daemon_status(socket_path) or {})["store"]["readings"]
        cgroup.reset_peak()
        reply = request(socket_path, {"cmd": "train"})
        if not reply.get("ok"):
            raise RuntimeError(f"train request refused: {reply}")
        peak, watchdog_peak, started, requested = 0.0, 0.0, False, time.monotonic()
        last: dict[str, Any] | None = None
        while True:
            peak = max(peak, cgroup.charge_mb())
            status = daemon_status(socket_path)
            if daemon.poll() is not None:
                row.daemon_alive = False
                row.outcome = f"daemon exited ({daemon.returncode})"
                break
            if status is None:
                time.sleep(SAMPLE_S)
                continue
            watchdog_peak = max(watchdog_peak, status["memory"]["usage_mb"])
            training = status["training"]
            started = started or training["state"] == "running"
            plan = training.get("plan")
            if plan:
                text = f"{plan['micro_batch']}x{plan['accumulation']}{' ckpt' if plan['checkpointing'] else ''} {plan['optimizer']}"
                if plan.get("forward_only"):
                    text = f"{plan['micro_batch']}x{plan['accumulation']} forward-only"
                elif plan.get("step_in_backward"):
                    text += " step-in-backward"
                if not row.plans or row.plans[-1] != text:
                    row.plans.append(text)
            if training.get("last") is not None:
                last = training["last"]
                break
            if not started and time.monotonic() - requested > HELD_S:
                row.outcome = f"held back: {training.get('trigger')}"
                break
            if time.monotonic() - requested > HANG_S:
                row.outcome = "no result"
                break
            time.sleep(SAMPLE_S)
        row.update_peak_mb, row.kernel_peak_mb, row.watchdog_peak_mb = peak, cgroup.peak_mb(), watchdog_peak
        row.oom_kills = cgroup.oom_kills()
        after = daemon_status(socket_path)
        if after is not None:
            row.stored_during_update = after["store"]["readings"] - stored_before
        if last is not None:
            row.accepted = bool(last.get("accepted"))
            outcome = last.get("outcome") or {}
            if outcome.get("stopped"):
                row.outcome = "stopped at critical"
            elif last.get("metrics_after") is None:  # no gate: it failed or was killed
                row.outcome = f"failed: {last.get('reason')}"
            else:
                row.outcome = "completed"
            row.wall_s = last.get("duration_s")
            row.techniques = last.get("techniques")
            if row.accepted and after is not None:
                row.adapter_bytes = (after.get("adapter") or {}).get("size_bytes")
            row.val_loss_before = (last.get("metrics_before") or {}).get("recent_val_loss")
            row.val_loss_after = (last.get("metrics_after") or {}).get("recent_val_loss")
            traces = sorted((workdir / "state" / "updates").glob("*.json"))
            if traces:
                trace = json.loads(traces[-1].read_text())
                row.worker_imports = trace.get("worker_imports")
                row.new_modules = trace.get("worker_new_modules")
                row.phases = phase_peaks(trace)
    return row


def run_idle(label: str, checkout: Path, minutes: int) -> list[dict[str, Any]]:
    """The idle service over `minutes`: the cgroup's charge once a minute, and each process's
    private MB (the daemon's; for this design the training helper's, whose private pages are
    its old copies of what the daemon wrote since the fork)."""
    samples: list[dict[str, Any]] = []
    with serving("default", checkout) as (service, _first):
        started = time.monotonic()
        for minute in range(minutes + 1):
            while time.monotonic() < started + 60 * minute:
                service.alive_status()
                time.sleep(1.0)
            others = [pid for pid in service.cgroup.pids() if pid != service.daemon.pid]
            samples.append({
                "label": label, "minute": minute, "charge_mb": service.cgroup.charge_mb(),
                "daemon_private_mb": private_mb(service.daemon.pid),
                "others_private_mb": sum(private_mb(pid) or 0.0 for pid in others), "others": len(others),
            })  # fmt: skip
            print(f"  {label} minute {minute}: {samples[-1]}", file=sys.stderr, flush=True)
    return samples


# The operator's stack, on: the sections a device adds to be watched (Prometheus metrics; add
# ("homeassistant", {"discovery": True}) where Home Assistant discovery exists). The metrics port
# is filled in per run (a free one).
ON_SECTIONS: list[tuple[str, dict[str, Any]]] = [("metrics", {"listen": "127.0.0.1:{port}"}), ("homeassistant", {"discovery": True})]
STACK_SCRAPE_S = 5.0  # scraped this often while measured, as a Prometheus would (more often than its 15 s)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_stack_idle(label: str, sections: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The default model serving with `sections` added: the median cgroup charge (and the tree's PSS)
    over SERVING_S once scoring has settled, scraping /metrics every STACK_SCRAPE_S when served."""
    import urllib.request

    port = _free_port()
    extra = {name: {key: value.format(port=port) if isinstance(value, str) else value for key, value in values.items()} for name, values in sections}
    url = f"http://127.0.0.1:{port}/metrics" if "listen" in extra.get("metrics", {}) else None
    with serving("default", ROOT, extra) as (service, first):
        wait_for(lambda: ((service.alive_status() or {}).get("scoring") or {}).get("steps", 0) >= first + SETTLE_SCORED, HANG_S, "live scoring to settle", interval=0.1)
        charges, scraped, next_scrape, size = [], 0, 0.0, 0
        deadline = time.monotonic() + SERVING_S
        while time.monotonic() < deadline:
            if url is not None and time.monotonic() >= next_scrape:
                with urllib.request.urlopen(url, timeout=10) as response:
                    size = len(response.read())
                scraped += 1
                next_scrape = time.monotonic() + STACK_SCRAPE_S
            charges.append(service.cgroup.charge_mb())
            time.sleep(SAMPLE_S)
        pids = service.cgroup.pids()
        modules = "prometheus_client" if url is not None else "-"
        return {
            "label": label, "sections": ", ".join(f"[{name}]" for name, _ in sections) or "none",
            "charge_mb": sorted(charges)[len(charges) // 2], "pss_mb": _pss_mb(pids), "scrapes": scraped, "scrape_bytes": size,
            "imports": modules,
        }  # fmt: skip


def operator_stack(repeat: int) -> list[str]:
    """Idle memory with ON_SECTIONS vs without, `repeat` pairs run side by side (the same machine state)."""
    results: list[dict[str, Any]] = []
    for _ in range(repeat):
        pair: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=lambda label=label, sections=sections: pair.append(run_stack_idle(label, sections)))
            for label, sections in (("off", []), ("on", ON_SECTIONS))
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results += sorted(pair, key=lambda r: r["label"] != "off")
    lines = ["| stack | sections | cgroup charge MB (median) | tree PSS MB | scrapes | scrape bytes |", "| --- | --- | --: | --: | --: | --: |"]
    for r in results:
        lines.append(f"| {r['label']} | {r['sections']} | {r['charge_mb']:.1f} | {r['pss_mb']:.1f} | {r['scrapes']} | {r['scrape_bytes']} |")
    off = [r["charge_mb"] for r in results if r["label"] == "off"]
    on = [r["charge_mb"] for r in results if r["label"] == "on"]
    lines.append(f"\non - off (cgroup charge, median of pairs): {sorted(b - a for a, b in zip(off, on))[len(on) // 2]:+.1f} MB")
    return lines


def idle_table(runs: list[list[dict[str, Any]]]) -> list[str]:
    lines = ["| daemon | minute | charge MB | daemon private MB | other processes' private MB |", "| --- | --: | --: | --: | --: |"]
    for samples in runs:
        for r in samples:
            if r["minute"] in (0, 1, 5) or r["minute"] % 10 == 0 or r is samples[-1]:
                lines.append(
                    f"| {r['label']} | {r['minute']} | {r['charge_mb']:.0f} | {_fmt(r['daemon_private_mb'])} "
                    f"| {r['others_private_mb']:.1f} ({r['others']}) |"
                )
    return lines


def phase_peaks(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Each phase of an update's trace with the worker's private MB and the service's usage at their peaks in it
    (none for a revision whose traces record neither: its `service_mb` was a sum of RSS)."""
    samples, phases = trace.get("samples") or {}, trace.get("phases") or []
    if "private_mb" not in samples:
        return []
    t = samples.get("t") or []
    out = []
    for i, phase in enumerate(phases):
        end = phases[i + 1]["t"] if i + 1 < len(phases) else float("inf")
        inside = [k for k, tk in enumerate(t) if phase["t"] <= tk <= end]

        def top(key: str, inside: list[int] = inside) -> float | None:
            values = [samples[key][k] for k in inside if key in samples and samples[key][k] is not None]
            return max(values) if values else None

        out.append({"phase": phase["phase"], "private_mb": top("private_mb"), "service_mb": top("service_mb")})
    return out


def search_limit(checkout: Path, lo: float, hi: float, probes: int, rung: str = "auto") -> list[Row]:
    """Bisect the smallest limit multiple under which a requested update completes (`rung`: the
    `[train] forward_only` setting: "auto" with the forward-only rung, "off" without)."""
    rows: list[Row] = []
    label = "limit" if rung == "auto" else "limit, no forward-only rung"
    extra = {"train": {**TRAIN, "forward_only": rung}}

    def ok(row: Row) -> bool:
        return row.outcome == "completed" and row.oom_kills == 0 and row.daemon_alive and row.stored_during_update > 0

    for multiple in (hi, lo):
        rows.append(run_row(label, "default", checkout, multiple, extra))
        print(_line(rows[-1]), flush=True)
    if ok(rows[-1]) or not ok(rows[-2]):
        return rows  # the bracket holds no boundary
    good, bad = hi, lo
    for _ in range(probes):
        mid = round((good + bad) / 2, 3)
        rows.append(run_row(label, "default", checkout, mid, extra))
        print(_line(rows[-1]), flush=True)
        if ok(rows[-1]):
            good = mid
        else:
            bad = mid
    return rows


# Each low-memory technique alone: the loosest plan (the whole batch in one micro-batch, no
# checkpointing, fp32 Adam state) with that one thing changed; then the planner's own choice.
ALONE = {"gradient_checkpointing": "off", "optimizer": "adamw", "step_in_backward": "off", "forward_only": "off"}
TECHNIQUES: list[tuple[str, dict[str, dict[str, Any]]]] = [
    ("none", {"train": ALONE}),
    ("micro-batches of 4, accumulated", {"train": {**ALONE, "micro_batch": 4}}),
    ("gradient checkpointing", {"train": {**ALONE, "gradient_checkpointing": "on"}}),
    ("8-bit optimizer state", {"train": {**ALONE, "optimizer": "adamw8bit"}}),
    ("optimizer step in backward", {"train": {**ALONE, "step_in_backward": "on"}}),
    ("reversible blocks", {"train": ALONE, "model": {"reversible": True}}),
    ("int8 adapter", {"train": ALONE, "lora": {"save": "int8"}}),
    ("forward-only", {"train": {**ALONE, "forward_only": "on"}}),
    ("the planner's choice", {}),
]
# The large model's rows train 10 steps (forward-only: 160) rather than 60: the same for every row.
LARGE_STEPS = 10


def technique_rows(sizes: list[str], only: list[str] | None = None) -> list[Row]:
    rows: list[Row] = []
    print(TECHNIQUE_HEADER)
    print("|" + " --- |" * (TECHNIQUE_HEADER.count("|") - 1))
    for size in sizes:
        for label, extra in TECHNIQUES:
            if only and not any(name in label for name in only):
                continue
            if size == "large":
                extra = {**extra, "train": {**extra.get("train", {}), "steps": LARGE_STEPS}}
            row = run_row(label, size, ROOT, None, extra)
            rows.append(row)
            print(_technique_line(row), flush=True)
    return rows


TECHNIQUE_HEADER = (
    "| technique | model | plan(s) | serving MB | update peak MB | added MB | peak / serving | outcome | wall s "
    "| val loss before -> after | adapter bytes | techniques it reports |"
)


def _technique_line(row: Row) -> str:
    added = None if row.update_peak_mb is None else row.update_peak_mb - row.serving_mb
    return (
        f"| {row.label} | {row.size} | {', '.join(row.plans) or '-'} | {_fmt(row.serving_mb)} | {_fmt(row.update_peak_mb)} | {_fmt(added, 1)} "
        f"| {_fmt(row.ratio, 3)} | {row.outcome}{' (OOM kills: %d)' % row.oom_kills if row.oom_kills else ''} | {_fmt(row.wall_s, 1)} "
        f"| {_fmt(row.val_loss_before, 4)} -> {_fmt(row.val_loss_after, 4)} | {row.adapter_bytes or '-'} | {', '.join(row.techniques or []) or '-'} |"
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (
    "| daemon | model | limit x serving | serving MB (cgroup) | serving PSS | serving RSS sum | update peak MB | peak / serving "
    "| kernel high-water | outcome | wall s | val loss before -> after | readings stored during update | worker imports |"
)


def _line(row: Row) -> str:
    imports = "-" if row.worker_imports is None else (", ".join(row.worker_imports) or "none")
    return (
        f"| {row.label} | {row.size} | {_fmt(row.limit_multiple, 3)} | {_fmt(row.serving_mb)} | {_fmt(row.serving_pss_mb)} "
        f"| {_fmt(row.serving_rss_sum_mb)} | {_fmt(row.update_peak_mb)} | {_fmt(row.ratio, 3)} | {_fmt(row.kernel_peak_mb)} "
        f"| {row.outcome}{' (OOM kills: %d)' % row.oom_kills if row.oom_kills else ''} | {_fmt(row.wall_s, 1)} "
        f"| {_fmt(row.val_loss_before, 4)} -> {_fmt(row.val_loss_after, 4)} | {row.stored_during_update} | {imports} |"
    )


def eight_bit_table() -> list[str]:
    """Whether 8-bit Adam state pays (`training.plan.EightBitPayoff`, the planner's own rule) for the LoRA the
    daemon trains on each model, for every block adapted, and for full fine-tuning (every weight)."""
    from edge_daemon.config import LoraConfigSection
    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.blocks import block_target_modules, expand_modules
    from edge_daemon.training.lora import attach_lora
    from edge_daemon.training.optimizer import BITSANDBYTES_IMPORT_MB, TORCH_DYNAMO_IMPORT_MB, EightBitPayoff

    def payoff_of(params: int) -> EightBitPayoff:
        # As in a training worker, where neither bitsandbytes nor torch._dynamo is loaded.
        return EightBitPayoff(EightBitPayoff.of(params).saving_mb, BITSANDBYTES_IMPORT_MB + TORCH_DYNAMO_IMPORT_MB)

    lines = ["| model | what trains | trainable parameters | 8-bit state saves MB | loading it costs MB | pays |", "| --- | --- | --: | --: | --: | --- |"]
    lora_cfg = LoraConfigSection()
    for size, spec in MODELS.items():
        cfg = ForecasterConfig(n_channels=len(CHANNELS), **spec)
        for what, blocks in (("LoRA, default (2 blocks)", lora_cfg.max_blocks), ("LoRA, every block", cfg.n_layers), ("full fine-tune", None)):
            model = Forecaster(cfg)
            if blocks is None:
                params = model.n_params()
            else:
                targets = [n for b in range(blocks) for n in block_target_modules(model, b, lora_cfg.target_modules)]
                attach_lora(model, targets + expand_modules(model, lora_cfg.extra_modules), lora_cfg.r, lora_cfg.alpha)
                params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            payoff = payoff_of(params)
            lines.append(f"| {size} | {what} | {params:,} | {payoff.saving_mb:.2f} | {payoff.import_mb:.0f} | {'yes' if payoff.pays else 'no'} |")
    # A model far beyond a device's, where it does pay: counted on the meta device, nothing allocated.
    import torch

    with torch.device("meta"):
        xl = Forecaster(ForecasterConfig(n_channels=len(CHANNELS), window=256, d_model=1024, n_heads=16, n_layers=16, d_ff=4096))
    payoff = payoff_of(xl.n_params())
    lines.append(f"| xl (d_model 1024, 16 layers) | full fine-tune | {xl.n_params():,} | {payoff.saving_mb:.2f} | {payoff.import_mb:.0f} | {'yes' if payoff.pays else 'no'} |")
    payoff = payoff_of(0)
    lines.append(f"\nbreak-even: {int((payoff.import_mb + 1.0) * 2**20 / 6):,} trainable parameters (6 bytes saved on each)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["default", "large", "both"], default="both")
    parser.add_argument(
        "--checkout", type=Path, action="append", default=[],
        help="also run the daemon of this checkout (another revision, with this interpreter and its packages)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="rows per size and daemon")
    parser.add_argument("--no-search", action="store_true", help="skip the smallest-limit search")
    parser.add_argument("--search-only", action="store_true", help="only the smallest-limit search")
    parser.add_argument("--search-lo", type=float, default=1.05)
    parser.add_argument("--search-hi", type=float, default=1.5)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--search-rung", choices=["auto", "off", "both"], default="auto", help="the search with the forward-only rung, without it, or both")
    parser.add_argument("--techniques", action="store_true", help="instead of the plain rows: an update with each technique alone, and the planner's")
    parser.add_argument("--technique", action="append", help="with --techniques: only the rows whose label holds this (repeatable)")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--idle-minutes", type=int, default=0, help="instead: each daemon idle (serving) this long, side by side")
    parser.add_argument("--operator-stack", action="store_true", help="instead: idle memory with ON_SECTIONS ([metrics] ...) vs without")
    args = parser.parse_args(argv)
    if args.operator_stack:
        print("\n".join(operator_stack(args.repeat)))
        return 0
    daemons = [("this", ROOT)] + [(_revision(c), c.resolve()) for c in args.checkout]
    if args.idle_minutes:
        runs: list[list[dict[str, Any]]] = [[] for _ in daemons]
        threads = [
            threading.Thread(target=lambda i=i, label=label, checkout=checkout: runs[i].extend(run_idle(label, checkout, args.idle_minutes)))
            for i, (label, checkout) in enumerate(daemons)
        ]  # fmt: skip
        for thread in threads:  # at once: the same machine state for every daemon
            thread.start()
        for thread in threads:
            thread.join()
        print("\n".join(idle_table(runs)))
        return 0
    sizes = ["default", "large"] if args.size == "both" else [args.size]
    rows: list[Row] = []
    if args.techniques:
        rows += technique_rows(sizes, args.technique)
        print()
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    for size in [] if args.search_only or args.techniques else sizes:
        for label, checkout in daemons:
            for _ in range(args.repeat):
                rows.append(run_row(label, size, checkout))
                print(_line(rows[-1]), flush=True)
    if not args.no_search:
        for rung in ("auto", "off") if args.search_rung == "both" else (args.search_rung,):
            found = search_limit(ROOT, args.search_lo, args.search_hi, args.probes, rung)
            rows += found
            done = [r for r in found if r.outcome == "completed" and r.oom_kills == 0]
            if done:
                best = min(done, key=lambda r: r.limit_multiple or 0)
                print(f"\n{found[0].label}: smallest limit with a completed update: {best.limit_multiple:.3f}x serving ({best.limit_mb:.0f} MB)\n")
    phased = [r for r in rows if r.phases]
    if phased:
        print("\nwhere an update's memory goes: the worker's private MB (its own pages) and the service's usage, at their peaks in each phase")
        print("| daemon | model | limit x serving | serving MB | " + " | ".join(p["phase"] for p in phased[0].phases) + " |")
        for r in phased:
            cells = " | ".join(f"{_fmt(p['private_mb'])} / {_fmt(p['service_mb'])}" for p in r.phases)
            print(f"| {r.label} | {r.size} | {_fmt(r.limit_multiple, 3)} | {_fmt(r.serving_mb)} | {cells} |")
    print()
    print("\n".join(eight_bit_table()))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
