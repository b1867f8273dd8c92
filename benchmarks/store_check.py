"""The store's check at start: `PRAGMA quick_check` on a full-size store, and what the daemon's
start spends on it.

    python benchmarks/store_check.py [--mb 128] [--keep DIR]

Builds a replay store of about `--mb` MB through `ReplayStore.write` (three channels at 1 reading/s,
the sample motor's sizes of value), closes it, then times `store.check_store` three ways: with the
file in the page cache (a restart), after dropping the page cache (a boot: needs root; skipped
otherwise), and on the same store with 64 KiB in the middle overwritten (the damaged case, which
also moves it aside). Beside it: opening the store (`ReplayStore(...)`), which the daemon does
anyway, as the baseline the check adds to; and opening a store of the same readings written with
the earlier (channel_id, ts) key, which moves them to the time-keyed table once (its time and the
file's size before and after). Last, the daemon's whole start on that store
(`python -m edge_daemon run`, a broker up, no base model: from the process's start until its
control socket answers `status`), with the file in the page cache and after dropping it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from edge_daemon.broker import LocalBroker  # noqa: E402
from edge_daemon.config import StoreConfig  # noqa: E402
from edge_daemon.store import Reading, ReplayStore, check_store  # noqa: E402
from tests.support import config_toml, daemon_status, legacy_store  # noqa: E402

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]
BATCH = 30_000


def build(path: Path, mb: float) -> tuple[int, float]:
    """Readings written and seconds taken to grow a store at `path` to `mb` MB."""
    cfg = StoreConfig(budget_mb=mb * 4, recent_hours=24 * 365)
    started, written, t0 = time.perf_counter(), 0, 1.7e9
    with ReplayStore(path, cfg, CHANNELS) as store:
        while store.size_bytes() < mb * 1024 * 1024:
            store.write([Reading(CHANNELS[k % 3], t0 + (written + k) // 3, 20.0 + ((written + k) % 997) * 0.013) for k in range(BATCH)])
            written += BATCH
    return written, time.perf_counter() - started


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(action) -> float:  # noqa: ANN001
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def daemon_start(root: Path, store: Path, mb: float, cold: bool) -> float:
    """Seconds from starting `python -m edge_daemon run` on `store` until its control socket
    answers `status` (a broker up; the page cache dropped first when `cold`); then SIGTERM."""
    state = root / "daemon-state"
    state.mkdir(exist_ok=True)
    if store.resolve() != (state / "store.db").resolve():
        os.replace(store, state / "store.db")
    (root / "broker").mkdir(exist_ok=True)
    broker = LocalBroker(workdir=root / "broker")
    broker.start()
    sock = root / "control.sock"
    config = root / "daemon.toml"
    config.write_text(config_toml({
        "device": {"id": "store-check", "state_dir": str(state), "socket": str(sock)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topics": ["sensors/#"]},
        "channels": {"names": CHANNELS, "period_s": 1.0},
        "store": {"budget_mb": mb * 4, "recent_hours": 24 * 365},
        "train": {"start_on": ["request"]},
    }))  # fmt: skip
    try:
        if cold and not drop_caches():
            return float("nan")
        started = time.perf_counter()
        with open(root / "daemon.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edge_daemon", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while daemon_status(sock) is None:
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({proc.returncode}):\n{(root / 'daemon.log').read_text()[-3000:]}")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        return seconds
    finally:
        broker.stop()
        os.replace(state / "store.db", store)
        for suffix in ("-wal", "-shm"):
            Path(f"{state / 'store.db'}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=128.0, help="store size to build")
    parser.add_argument("--keep", type=Path, help="build in (and keep) this directory instead of a temporary one")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="store-check-"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / "store.db"
    try:
        readings, build_s = build(path, args.mb)
        size = path.stat().st_size + (Path(f"{path}-wal").stat().st_size if Path(f"{path}-wal").exists() else 0)
        print(f"store: {readings:,} readings, {size / 1e6:.1f} MB (built in {build_s:.0f} s)\n")
        cfg = StoreConfig(budget_mb=args.mb * 4, recent_hours=24 * 365)
        rows = []
        warm = [check_store(path) for _ in range(3)]
        assert all(c.problem is None for c in warm), warm
        rows.append(("quick_check, file in the page cache (a restart), best of 3", min(c.seconds for c in warm)))
        rows.append(("opening the store (the daemon does it anyway), in the page cache", timed(lambda: ReplayStore(path, cfg, CHANNELS).close())))
        if drop_caches():
            cold = check_store(path)
            assert cold.problem is None
            rows.append(("quick_check, page cache dropped (a boot)", cold.seconds))
            drop_caches()
            rows.append(("opening the store, page cache dropped", timed(lambda: ReplayStore(path, cfg, CHANNELS).close())))
        daemon_start(root, path, args.mb, cold=False)  # a first start: the libraries into the page cache
        rows.append(("the daemon's whole start (until `status` answers), in the page cache", daemon_start(root, path, args.mb, cold=False)))
        if os.geteuid() == 0:
            rows.append(("the daemon's whole start, page cache dropped (a boot)", daemon_start(root, path, args.mb, cold=True)))
        legacy = root / "legacy" / "store.db"
        legacy.parent.mkdir(exist_ok=True)
        t0 = 1.7e9
        legacy_store(legacy, ((CHANNELS[i % 3], t0 + i // 3, 20.0 + (i % 997) * 0.013) for i in range(readings)))
        legacy_size = legacy.stat().st_size
        moved_s = timed(lambda: ReplayStore(legacy, cfg, CHANNELS).close())
        rows.append(
            (
                f"opening a store of the earlier (channel_id, ts) key: moving its readings ({legacy_size / 1e6:.1f} MB"
                f" before, {legacy.stat().st_size / 1e6:.1f} MB after)",
                moved_s,
            )
        )
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            f.write(os.urandom(64 * 1024))
        damaged = check_store(path)
        assert damaged.problem is not None and damaged.moved_to is not None
        rows.append((f"quick_check, 64 KiB overwritten mid-file (found: {damaged.problem[:60]})", damaged.seconds))
        print("| check | seconds |")
        print("|---|--:|")
        for label, seconds in rows:
            print(f"| {label} | {seconds:.2f} |")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
