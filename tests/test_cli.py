"""The client commands of the CLI: human and --json output, exit codes, messages, import cost.

Against a real ControlServer whose handlers return the daemon's reply shapes, and `status`
against a real daemon process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_control import ADAPTER, ADAPTERS, DRIFT, STATUS, FakeDaemon

from edge_daemon import cli
from edge_daemon.cli.render import NO_BASE
from edge_daemon.broker import LocalBroker
from edge_daemon.control.server import ControlServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def sock(tmp_path: Path, fake: FakeDaemon) -> Iterator[Path]:
    srv = ControlServer(tmp_path / "run" / "control.sock", fake.handlers())
    srv.start()
    try:
        yield srv.path
    finally:
        srv.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


COMMANDS: list[tuple[list[str], str, dict[str, Any]]] = [
    (["status"], "status", {"ok": True, **STATUS}),
    (["adapter"], "adapter", {"ok": True, "adapter": ADAPTER}),
    (["adapters"], "adapters", {"ok": True, **ADAPTERS}),
    (["drift"], "drift", {"ok": True, "drift": DRIFT}),
    (["train"], "train", {"ok": True, "accepted": True, "state": "running", "message": "update started"}),
]


@pytest.mark.parametrize(("argv", "cmd", "expected"), COMMANDS, ids=[c[1] for c in COMMANDS])
def test_json_output_is_the_reply(
    capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon, argv: list[str], cmd: str, expected: dict[str, Any]
) -> None:
    code, out, err = run(capsys, *argv, "--json", "--socket", str(sock))
    assert (code, err) == (0, "")
    assert json.loads(out) == expected
    assert fake.requests == [{"cmd": cmd}]


def test_rollback_json_sends_an_int_version(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    code, out, _ = run(capsys, "rollback", "v2", "--json", "--socket", str(sock))
    assert code == 0
    assert json.loads(out) == {"ok": True, "adapter": {k: ADAPTERS["adapters"][1][k] for k in ADAPTER}}
    assert fake.requests == [{"cmd": "rollback", "version": 2}]


def test_status_human(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == "pump-07  up 1h 2m"
    assert "store     123,456 readings, 2.3 MB" in lines
    # A message may carry several readings: each count says which it counts.
    # (the console wraps long lines at its width)
    assert "ingest 1,000 messages received, 990 readings stored, 10 rejected (bad_json 4, too_old 6)" in " ".join(out.split())
    assert "adapter   v3 (created 2024-05-01 12:00:03Z, 45.7 kB, val_loss 0.01234)" in lines
    assert "drift     DETECTED on m1/vibration; last detection 2024-05-01 12:00:03Z" in lines
    assert "memory    312 MB RSS of 1,024 MB budget (31%); level elevated" in lines
    assert "training  idle" in lines
    assert "  plan    micro-batch 8 x 4 accumulation, checkpointing on, optimizer adamw8bit" in lines
    assert "  last    accepted v3 2024-05-01 12:00:03Z (beat the incumbent)" in lines


def test_status_human_with_sections_missing_or_odd(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    fake.status = {"device": "bare", "uptime_s": 5}
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert code == 0 and out.strip() == "bare  up 5s"
    # Wrong types, nulls, a base-only adapter, no plan, an unknown extra section, markup-like names.
    fake.status = {
        "device": "[red]odd[/red]",
        "store": {"readings": None},
        "ingest": "not a dict",
        "adapter": {"version": None},
        "drift": {"detected": False, "channels": {"[b]x": {"state": "stable"}}, "last_detected": None},
        "memory": {"rss_mb": "lots", "level": "weird"},
        "training": {"state": "paused", "last": {}, "plan": None},
        "scheduler": {"next_update": "2024-05-01T13:00:00+00:00"},
    }
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert code == 0, out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0] == "[red]odd[/red] up -"
    assert "store - readings, -" in lines
    assert not any(line.startswith("ingest") for line in lines)
    assert "adapter base model only (no adapter yet)" in lines
    assert "drift none (1 channels watched)" in lines
    assert "memory - RSS; level weird" in lines
    assert "training paused" in lines and not any("plan" in line for line in lines)
    assert 'scheduler {"next_update": "2024-05-01T13:00:00+00:00"}' in lines


def test_adapter_human(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    code, out, _ = run(capsys, "adapter", "--socket", str(sock))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines == ["serving adapter v3", "created   2024-05-01 12:00:03Z", "size      45.7 kB", "val_loss  0.01234"]
    fake.status["adapter"] = None
    code, out, _ = run(capsys, "adapter", "--socket", str(sock))
    assert (code, out) == (0, "serving the base model only (no adapter yet)\n")
    fake.status["adapter"] = {"version": None, "base": False}
    code, out, _ = run(capsys, "adapter", "--socket", str(sock))
    assert (code, out.strip()) == (0, NO_BASE)


def test_adapter_human_as_the_daemon_sends_it(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    """The keys the daemon adds while an adapter serves: `base` (a base model exists) is not shown as
    if the base served, the numbers are rounded, the metrics and plan are read as such."""
    fake.status["adapter"] = {
        **ADAPTER, "base": True, "peak_rss_mb": 318.9609375, "reason": "drift detected", "chosen_blocks": [0, 1],
        "metrics_before": {"recent_val_loss": 0.51234567, "replay_val_loss": 0.2}, "metrics_after": {"recent_val_loss": 0.31, "replay_val_loss": 0.21},
        "plan": {"micro_batch": 16, "accumulation": 1, "checkpointing": False, "optimizer": "adamw"}, "wall_s": 12.3456789,
    }  # fmt: skip
    code, out, _ = run(capsys, "adapter", "--socket", str(sock))
    assert code == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0] == "serving adapter v3"
    assert not any(line.startswith("base") for line in lines) and "318.96" not in out
    assert "update peak RSS 319 MB" in lines
    assert "recent loss 0.5123 -> 0.31" in lines and "replay loss 0.2 -> 0.21" in lines
    text = " ".join(out.split())  # the console wraps long lines at its width
    assert "start plan micro-batch 16 x 1 accumulation, checkpointing off, optimizer adamw" in text
    assert "trained blocks 0, 1" in lines and "reason drift detected" in lines and "wall_s 12.35" in lines


def test_adapters_human(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    code, out, _ = run(capsys, "adapters", "--socket", str(sock))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0].split() == ["version", "created", "size", "val_loss", "recent", "loss", "replay", "loss"]
    assert lines[1].split() == ["v1", "2024-05-01", "12:00:00Z", "40.0", "kB", "0.1", "0.2", "->", "0.11", "0.3", "->", "0.29"]
    assert lines[3].split()[:2] == ["*", "v3"]  # the current one is marked
    assert not lines[1].startswith("*") and not lines[2].startswith("*")
    assert lines[-1] == "current: v3"
    fake.adapters = {"current": None, "adapters": []}
    code, out, _ = run(capsys, "adapters", "--socket", str(sock))
    assert (code, out) == (0, "no adapters yet (serving the base model)\n")


def test_drift_human(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    code, out, _ = run(capsys, "drift", "--socket", str(sock))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == "drift: DETECTED on m1/vibration; last detection 2024-05-01 12:00:03Z"
    assert lines[1].split() == ["channel", "state", "count", "last", "detected", "input", "PSI", "residual", "baseline", "ratio"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["m1/vibration"] == ["drift", "2", "2024-05-01", "12:00:03Z", "2.5", "1.8", "0.9", "2.00"]
    assert rows["m1/temperature"] == ["stable", "0", "-", "0.12", "0.4", "0.5", "0.80"]
    # Both windows still learning their reference.
    assert rows["m1/current"] == ["stable", "1", "2024-04-30", "08:00:00Z", "learning", "35%", "-", "learning", "40%", "-"]


def test_train_human_and_not_accepted(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    code, out, _ = run(capsys, "train", "--socket", str(sock))
    assert (code, out) == (0, "update started (trainer running)\n")
    # The daemon's own message when it takes a request, shown once, not under a heading repeating it.
    fake.train_reply = {"accepted": True, "state": "idle", "message": "update requested: it starts when the device is idle and memory is normal"}
    code, out, _ = run(capsys, "train", "--socket", str(sock))
    assert (code, " ".join(out.split())) == (0, "update requested: it starts when the device is idle and memory is normal (trainer idle)")
    fake.train_reply = {"accepted": False, "state": "running", "message": "an update is already running"}
    code, out, _ = run(capsys, "train", "--socket", str(sock))
    assert (code, out) == (1, "update not started: an update is already running (trainer running)\n")


def test_rollback_human_and_error_reply(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    code, out, _ = run(capsys, "rollback", "1", "--socket", str(sock))
    assert (code, out) == (0, "now serving v1 (created 2024-05-01 12:00:00Z, 40.0 kB, val_loss 0.1)\n")
    assert fake.adapters["current"] == 1
    code, out, err = run(capsys, "rollback", "7", "--socket", str(sock))
    assert (code, out) == (1, "")
    assert err == "edge-daemon: no adapter v7 (have v1, v2, v3)\n"
    # With --json the error object goes to stdout too, for scripts.
    code, out, err = run(capsys, "rollback", "7", "--json", "--socket", str(sock))
    assert code == 1 and json.loads(out) == {"ok": False, "error": "no adapter v7 (have v1, v2, v3)"}
    assert "no adapter v7" in err


@pytest.mark.parametrize("answer", [b'{"ok": false}\n', b'{"hello": "not a daemon"}\n'])
def test_a_reply_without_ok_or_error_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, answer: bytes
) -> None:
    """Whatever listens on the socket (an older daemon, something else) may answer in another shape."""
    import socketserver
    import threading

    class Answer(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            self.wfile.write(answer)

    path = tmp_path / "other.sock"
    with socketserver.UnixStreamServer(str(path), Answer) as server:
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        code, out, err = run(capsys, "drift", "--socket", str(path))
        thread.join()
    assert (code, out) == (cli.EXIT_ERROR, "")
    assert err == "edge-daemon: the daemon refused the request\n"


@pytest.mark.parametrize("bad", ["0", "-1", "three", "1.5"])
def test_rollback_rejects_a_bad_version_before_asking(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon, bad: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rollback", bad, "--socket", str(sock)])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "VERSION" in capsys.readouterr().err
    assert fake.requests == []


def test_unreachable_daemon_says_what_to_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    code, out, err = run(capsys, "status", "--json", "--socket", str(missing))
    assert (code, out) == (cli.EXIT_UNREACHABLE, "")
    assert f"no daemon socket at {missing}" in err
    assert f"socket path: {missing} (from --socket)" in err
    assert "systemctl status edge-daemon" in err and "daemon's group" in err


def test_stale_socket_is_reported_as_unreachable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import socket

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    code, _, err = run(capsys, "drift", "--socket", str(stale))
    assert code == cli.EXIT_UNREACHABLE and "stale socket" in err and "systemctl status" in err


def test_a_regular_file_is_not_called_a_stale_socket(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    not_a_socket = tmp_path / "config.toml"
    not_a_socket.write_text("[device]\n")
    code, _, err = run(capsys, "status", "--socket", str(not_a_socket))
    assert code == cli.EXIT_UNREACHABLE
    assert f"{not_a_socket} is not a socket" in err and "stale" not in err
    assert "[device] socket" in err


def test_config_errors_are_printed_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nid = "pump 07"\nwhatever = 1\n[mqtt]\n[channels]\nnames = ["m1/current"]\n')
    code, out, err = run(capsys, "status", "--config", str(bad))
    assert (code, out) == (cli.EXIT_ERROR, "")
    lines = err.splitlines()
    assert lines[0] == f"edge-daemon: {bad}: invalid configuration"
    problems = lines[1:]
    assert len(problems) == 2 and len(set(problems)) == 2, err
    assert any(line.startswith("  device.id: ") for line in problems) and "  device.whatever: unknown key" in problems
    # An unreadable file: its one line, once.
    code, _, err = run(capsys, "status", "--config", str(tmp_path / "missing.toml"))
    assert code == cli.EXIT_ERROR and err.count("No such file") == 1, err


def test_socket_from_config(capsys: pytest.CaptureFixture[str], tmp_path: Path, sock: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[device]\nid = "pump-07"\nsocket = "{sock}"\n[mqtt]\n[channels]\nnames = ["m1/current"]\n')
    code, out, _ = run(capsys, "adapter", "--json", "--config", str(config))
    assert code == 0 and json.loads(out)["adapter"]["version"] == 3
    config.write_text('[device]\nid = "pump 07"\n')
    code, _, err = run(capsys, "adapter", "--config", str(config))
    assert code == cli.EXIT_ERROR and "device.id" in err


def test_every_command_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("run", "validate-config", "status", "adapter", "adapters", "drift", "train", "rollback"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        help_text = capsys.readouterr().out
        assert f"example:\n  edge-daemon {name}" in help_text or f"example:\n  sudo edge-daemon {name}" in help_text


def test_json_output_skips_rich_and_pydantic(sock: Path) -> None:
    # What the command imports is the cost that matters here; its wall time belongs to benchmarks.
    script = (
        "import sys; from edge_daemon.cli import main; "
        f"code = main(['status', '--json', '--socket', {str(sock)!r}]); "
        "print('HEAVY', sorted(m for m in ('rich', 'pydantic', 'torch') if m in sys.modules), file=sys.stderr); "
        "sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == "pump-07"
    assert "HEAVY []" in result.stderr


# -- against a real daemon ---------------------------------------------------------------------


def test_status_human_says_what_scoring_could_not_use(capsys: pytest.CaptureFixture[str], sock: Path, fake: FakeDaemon) -> None:
    scoring = {"steps": 1300, "scored": 1200, "anomalies": 2, "dropped_batches": 0, "dropped_readings": 0, "failures_in_a_row": 0, "last": None, "serving": None,
               "late_readings": 45, "last_late": "2024-05-01T12:00:03+00:00", "held": 3, "outliers": 1, "set_aside": 0, "stalled": None}  # fmt: skip
    fake.status = {"device": "pump-07", "uptime_s": 5, "scoring": scoring}
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert code == 0
    text = " ".join(out.split())  # the console wraps long lines at its width
    assert ("scoring 1,200 steps scored, 2 anomalies, 45 late readings (latest stamped 2024-05-01 12:00:03Z), "
            "1 outliers set aside, 3 held for the clock") in text  # fmt: skip
    fake.status["scoring"] = {**scoring, "late_readings": 0, "held": 0, "outliers": 0, "stalled": "scoring stalled: no grid step for 61 s"}
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert "scoring 1,200 steps scored, 2 anomalies; scoring stalled: no grid step for 61 s" in " ".join(out.split())
    serving = {"served": "ridge", "served_by_channel": {"m1/temperature": "ridge"}, "mode": "best", "steps_compared": 600,
               "baselines_only": True, "mae": {"persistence": 0.5, "ridge": 0.25}, "mae_by_channel": {}, "switches": 0, "horizons": {}}  # fmt: skip
    fake.status["scoring"] = {**scoring, "late_readings": 0, "held": 0, "outliers": 0, "serving": serving}
    code, out, _ = run(capsys, "status", "--socket", str(sock))
    assert ("serving ridge (no base model yet: baselines fitted on the store) (mean |error| persistence 0.5, ridge 0.25 over "
            "600 steps)") in " ".join(out.split())  # fmt: skip


def test_status_against_a_real_daemon(capsys: pytest.CaptureFixture[str], tmp_path: Path, broker: LocalBroker) -> None:
    from test_daemon_ingest import DaemonProcess, write_config

    daemon = DaemonProcess(write_config(tmp_path, broker), tmp_path / "control.sock", tmp_path / "daemon.log")
    try:
        daemon.start()
        code, out, err = run(capsys, "status", "--json", "--config", str(daemon.config_path))
        assert (code, err) == (0, "")
        reply = json.loads(out)
        assert reply["ok"] is True and reply["device"] == "test-dev"
        assert set(reply["store"]) == {"readings", "bytes", "disk_free_bytes", "disk_full", "check", "damaged"}
        assert set(reply["ingest"]) >= {"received", "stored", "rejected", "rejected_by_reason"}
        code, out, _ = run(capsys, "status", "--socket", str(daemon.socket_path))
        assert code == 0
        lines = [line.rstrip() for line in out.splitlines()]
        assert lines[0].startswith("test-dev  up ")
        assert any(line.startswith("store     0 readings, ") for line in lines)
        assert any(line.startswith("ingest    connected; 0 messages received, 0 readings") for line in lines)
        assert daemon.terminate() == 0
        code, _, err = run(capsys, "status", "--socket", str(daemon.socket_path))
        assert code == cli.EXIT_UNREACHABLE and "no daemon socket" in err
    finally:
        daemon.close()



def test_install_and_uninstall_take_their_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # The documented `edge-daemon install --prefix ...` form: options reach the installer.
    code, _, err = run(capsys, "install", "--prefix", str(tmp_path), "--no-venv", "--no-systemctl", "--device-id", "pump-07")
    assert code == 0, err
    assert 'id = "pump-07"' in (tmp_path / "etc/edge-daemon/config.toml").read_text()
    assert (tmp_path / "etc/systemd/system/edge-daemon.service").is_file()
    code, _, err = run(capsys, "uninstall", "--prefix", str(tmp_path), "--no-systemctl", "--purge")
    assert code == 0, err
    assert not (tmp_path / "etc/edge-daemon").exists() and not (tmp_path / "etc/systemd/system/edge-daemon.service").exists()
    with pytest.raises(SystemExit) as usage:
        cli.main(["install", "--no-such-option"])
    assert usage.value.code == 2


def test_memory_is_shown_as_the_kernel_counts_it() -> None:
    from edge_daemon.cli.render import describe_memory

    memory = {"rss_mb": 520.0, "usage_mb": 260.0, "usage_source": "pss", "budget_mb": 1024.0, "level": "normal"}
    # PSS (or the cgroup's charge), the measure the level is judged by, not the RSS sum.
    assert describe_memory(memory) == "260 MB (pss) of 1,024 MB budget (25%); level [green]normal[/green]"  # type: ignore[arg-type]
