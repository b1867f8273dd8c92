"""The package's layout: what the daemon loads, and what it must not."""

from __future__ import annotations

import subprocess
import sys

# Tools a user runs by hand, and the test broker: never loaded by a running daemon, so they
# cost its memory nothing and a change to them cannot break serving.
OFF_THE_DAEMON_PATH = ("edge_daemon.report", "edge_daemon.demo", "edge_daemon.install", "edge_daemon.broker", "matplotlib")


def test_the_daemon_does_not_import_the_report_demo_install_or_test_broker() -> None:
    code = (
        "import sys\n"
        "import edge_daemon.daemon, edge_daemon.training.worker\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({OFF_THE_DAEMON_PATH!r}))\n"
        "print(','.join(loaded) or 'clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "clean", out.stdout + out.stderr
