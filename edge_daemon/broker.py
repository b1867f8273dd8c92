"""A throwaway local MQTT broker for the demo and the tests.

Runs the `mosquitto` binary on a free loopback port with its own config and
persistence directory; where mosquitto is not installed it runs the
pure-Python `amqtt` broker (MQTT 3.1.1 only) in a child process instead.
The broker can be stopped and restarted on the same port, keeping its
persistent sessions, so fault tests can pull it away mid-stream.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and this process has not handed out before.

    Not reusing ports keeps a client that still reconnects to an earlier, stopped broker from
    reaching a later one.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no unused TCP port found")


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_AMQTT_MAIN = """
import asyncio, sys
from amqtt.broker import Broker

async def main(port):
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


class LocalBroker:
    """A broker process on 127.0.0.1:<port>; `start`, `stop`, `restart`.

    `conf` adds mosquitto.conf lines at the end (mosquitto only): the listener's TLS
    `cafile`/`certfile`/`keyfile`, a `password_file` with `allow_anonymous false`, a second listener.
    """

    def __init__(self, port: int | None = None, workdir: Path | None = None, prefer: str = "mosquitto", conf: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edge-broker-"))
        self.kind = "mosquitto" if prefer == "mosquitto" and shutil.which("mosquitto") else "amqtt"
        self._proc: subprocess.Popen[bytes] | None = None
        if conf and self.kind != "mosquitto":
            raise RuntimeError("mosquitto.conf lines given but mosquitto is not installed")
        self.conf = conf.strip()

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\n"
                # Run as the caller: mosquitto started as root would drop to the
                # `mosquitto` user and lose access to a private persistence dir.
                f"user {getpass.getuser()}\n"
                # Sessions and queued QoS 1 messages survive a broker restart.
                "persistence true\n"
                f"persistence_location {self.workdir}/\n"
                "max_queued_messages 0\n"
                "max_inflight_messages 100\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
                + ("" if "allow_anonymous" in self.conf else "allow_anonymous true\n")
                # Options after the listener line above apply to it (a second `listener` line in
                # `conf` starts another).
                + (f"{self.conf}\n" if self.conf else "")
            )
            return [shutil.which("mosquitto") or "mosquitto", "-c", str(conf)]
        return [sys.executable, "-c", _AMQTT_MAIN, str(self.port)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self.running:
            return self
        log_file = open(self.workdir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen(self._command(), stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} broker exited at start: {(self.workdir / 'broker.log').read_text()[-2000:]}")
            if port_open(self.host, self.port):
                log.info("%s broker listening on %s:%d", self.kind, self.host, self.port)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} broker did not listen on port {self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            # SIGTERM lets mosquitto write its persistence file.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> LocalBroker:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
