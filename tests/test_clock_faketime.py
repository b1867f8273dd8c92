"""The daemon started under a wrong clock (libfaketime, from Debian's packages), then the clock
corrected: every reading published meanwhile is stored exactly once and the daemon never exits."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import CHANNELS
from edge_daemon.broker import LocalBroker
from test_daemon_ingest import HANG_S, DaemonProcess, stored_keys, wait_for, write_config

pytestmark = pytest.mark.slow

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime")
DAY = 86400.0

# libfaketime 0.9.10 fails an absolute clock_nanosleep on the real monotonic clock with EINVAL,
# which is what time.sleep makes; waits on locks and events work. The daemon under test gets
# this sleep in its place (a quirk of the test tool, not of the daemon).
SITECUSTOMIZE = '''
import threading, time
_never = threading.Event()
def _sleep(seconds):
    if seconds > 0:
        _never.wait(seconds)
time.sleep = _sleep
'''


@pytest.fixture(scope="module")
def libfaketime(request: pytest.FixtureRequest) -> Path:
    """libfaketime.so.1: installed, or unpacked from Debian's package into pytest's cache."""
    for directory in LIB_DIRS:
        if (Path(directory) / "libfaketime.so.1").exists():
            return Path(directory) / "libfaketime.so.1"
    cache = Path(request.config.cache.mkdir("libfaketime"))
    found = sorted(cache.glob("**/libfaketime.so.1"))
    if found:
        return found[0]
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("libfaketime is not installed and there is no apt-get to fetch it")
    download = subprocess.run(["apt-get", "download", "libfaketime"], cwd=cache, capture_output=True, text=True, timeout=300)
    debs = sorted(cache.glob("libfaketime_*.deb"))
    if download.returncode != 0 or not debs:
        pytest.skip(f"cannot fetch libfaketime: {download.stderr.strip()[-300:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(cache / "root")], check=True, timeout=60)
    found = sorted(cache.glob("root/**/libfaketime.so.1"))
    if not found:
        pytest.skip("the libfaketime package holds no libfaketime.so.1")
    return found[0]


def _publish(broker: LocalBroker, client_id: str, start: float, steps: int) -> set[tuple[int, float]]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(100)
    client.connect(broker.host, broker.port)
    client.loop_start()
    keys = set()
    infos = []
    for k in range(steps):
        ts = round(start + k, 3)
        values = {"temperature": 20.0 + (k % 7), "vibration": 0.5, "current": 3.0 + (k % 3)}
        infos.append(client.publish("sensors/m1", json.dumps({"ts": ts, "values": values}), qos=1))
        keys.update((i, ts) for i in range(len(CHANNELS)))
    for info in infos:
        info.wait_for_publish(HANG_S)
    client.loop_stop()
    client.disconnect()
    return keys


class StatusWatcher:
    """Counts the daemon's retained-status refreshes (its `status` background job)."""

    def __init__(self, broker: LocalBroker) -> None:
        self.count = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edge/test-dev/status", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.count += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize(
    ("shift", "jump_s"),
    [
        ("-2d", 2 * DAY),  # booted with the time of the last shutdown: readings look "future"; NTP steps it forward
        ("+10d", -10 * DAY),  # a clock set ahead (a bad RTC): readings look "too old"; NTP steps it back
    ],
)
def test_a_daemon_started_on_a_wrong_clock_stores_everything_once_the_clock_is_corrected(
    tmp_path: Path, broker: LocalBroker, libfaketime: Path, shift: str, jump_s: float
) -> None:
    offset = tmp_path / "faketime"
    offset.write_text(shift + "\n")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        "LD_PRELOAD": str(libfaketime),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1",  # the file is read again at most a second after it changes
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # as on a device: NTP steps the wall clock only
        "PYTHONPATH": str(shim),
    }
    # "never": the hold does not depend on what this machine's kernel says of its own clock.
    write_config(
        tmp_path, broker, store={"flush_interval_s": 0.05, "clock_trust": "never"}, outputs={"status_interval_s": 0.5}
    )
    daemon = DaemonProcess(tmp_path / "config.toml", tmp_path / "control.sock", tmp_path / "daemon.log")
    watcher = StatusWatcher(broker)
    try:
        daemon.start(env=env)
        now = time.time()
        expected = _publish(broker, "faketime-before", now - 600, 600)
        wait_for(lambda: daemon.status()["ingest"]["held"] == len(expected), HANG_S, "the readings held")
        status = daemon.status()
        assert status["store"]["readings"] == 0 and status["ingest"]["clock"]["holding"] == len(expected)
        assert status["ingest"]["rejected"] == 0, status["ingest"]["rejected_by_reason"]
        # Held readings are not scored while held (one stamped far ahead would move scoring's
        # horizon); `status` says how many wait.
        assert status["scoring"]["steps"] == 0 and status["scoring"]["held"] == len(expected)

        offset.write_text("+0\n")  # NTP corrects the clock
        wait_for(lambda: daemon.status()["store"]["readings"] == len(expected), HANG_S, "the held readings stored")
        # Released into the store, they are scored.
        wait_for(lambda: daemon.status()["scoring"]["steps"] > 0, HANG_S, "the released readings scored")
        assert daemon.status()["scoring"]["held"] == 0
        # The background jobs run on after the step (apscheduler counts in wall-clock time).
        refreshed = watcher.count
        wait_for(lambda: watcher.count >= refreshed + 3, HANG_S, "the status job after the clock step")
        steps = daemon.status()["scoring"]["steps"]
        expected |= _publish(broker, "faketime-after", time.time() - 5, 30)
        wait_for(lambda: daemon.status()["store"]["readings"] == len(expected), HANG_S, "readings after the correction")
        # The scoring grid carries on across the step (its steps follow the readings' timestamps).
        wait_for(lambda: daemon.status()["scoring"]["steps"] > steps, HANG_S, "grid steps after the correction")
        status = daemon.status()
        clock = status["ingest"]["clock"]
        assert clock["jumps"] >= 1 and clock["last_jump_s"] == pytest.approx(jump_s, abs=60) and clock["holding"] == 0
        assert status["ingest"]["released"] == 1800 and status["ingest"]["rejected"] == 0
        assert daemon.proc is not None and daemon.proc.poll() is None  # never exited
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()
    assert stored_keys(tmp_path) == expected
