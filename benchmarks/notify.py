"""sd_notify cost: edge_daemon.notify against the maintained libraries, per call and at import.

Run with any interpreter that can import edge_daemon (and, to compare,
sdnotify and/or cysystemd):  python benchmarks/notify.py [--calls N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

IMPORTS = {
    # What edge_daemon.notify pulls in; the daemon imports these anyway.
    "stdlib: logging socket threading": "import logging, socket, threading",
    "edge_daemon.notify": "import edge_daemon.notify",
    "sdnotify": "import sdnotify",
    "cysystemd": "from cysystemd import daemon",
}


def import_cost_ms(statement: str, runs: int) -> float | None:
    """Median wall time of a fresh interpreter running `statement`, minus an empty one."""

    def once(code: str) -> float:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        if proc.returncode:
            raise ImportError(proc.stderr.decode()[-200:])
        return time.perf_counter() - start

    try:
        once(statement)  # warm the page cache
    except ImportError:
        return None
    base = statistics.median(once("pass") for _ in range(runs))
    return (statistics.median(once(statement) for _ in range(runs)) - base) * 1000


DRAIN = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
sock.bind(sys.argv[1])
n = 0
while sock.recv(4096) != b"END":
    n += 1
print(n)
"""


def senders() -> dict[str, Callable[[], object]]:
    from edge_daemon import notify

    found: dict[str, Callable[[], object]] = {"edge_daemon.notify.watchdog_ping": notify.watchdog_ping}
    try:
        import sdnotify

        notifier = sdnotify.SystemdNotifier()  # keeps one socket open
        found["sdnotify.SystemdNotifier.notify"] = lambda: notifier.notify("WATCHDOG=1")
    except ImportError:
        pass
    try:
        from cysystemd import daemon

        found["cysystemd.daemon.notify"] = lambda: daemon.notify(daemon.Notification.WATCHDOG)
    except ImportError:
        pass
    return found


def per_call_us(send: Callable[[], object], calls: int) -> float:
    for _ in range(100):
        send()
    start = time.perf_counter()
    for _ in range(calls):
        send()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--import-runs", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        # systemd's side in another process that drains the socket: a datagram
        # queue holds only a few messages, and a sender that blocks on a full
        # queue while holding the GIL (cysystemd does) would starve a drain
        # thread in this process.
        drain = subprocess.Popen([sys.executable, "-c", DRAIN, path], stdout=subprocess.PIPE, text=True)
        while not os.path.exists(path):
            time.sleep(0.01)
        os.environ["NOTIFY_SOCKET"] = path
        print(f"python {sys.version.split()[0]}, {args.calls} WATCHDOG=1 sends each")
        for name, send in senders().items():
            cost = per_call_us(send, args.calls)
            print(f"  {name:36s} {cost:7.1f} us/call")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"END", path)
        print(f"  (receiver got {drain.communicate(timeout=30)[0].strip()} datagrams)")

    print(f"import cost (median of {args.import_runs} fresh interpreters, minus `pass`)")
    for name, statement in IMPORTS.items():
        cost = import_cost_ms(statement, args.import_runs)
        print(f"  {name:36s} " + ("not installed" if cost is None else f"{cost:7.1f} ms"))


if __name__ == "__main__":
    main()
