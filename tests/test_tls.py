"""MQTT over TLS against a real mosquitto with certificates made here by openssl: readings stored
with a client certificate; a wrong CA or host name fails, is reported (status, STATUS=, log) and
sends nothing in plaintext; password and key files read at start; validate-config's warnings."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_daemon.broker import LocalBroker, free_port
from edge_daemon.cli import main as cli_main
from edge_daemon.config import Config
from edge_daemon.control.status import StatusParts, StatusReport
from edge_daemon.daemon import Daemon
from edge_daemon.errors import ConfigError
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.store import ReplayStore
from tests.conftest import CHANNELS, make_config, running_broker
from tests.support import config_toml, daemon_status, openssl_ca, openssl_signed, wait_for

HANG_S = 30.0
KEY_PASSPHRASE = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("openssl") is None, reason="needs mosquitto and openssl"
)


@dataclass(frozen=True)
class Pki:
    """A CA and what it signed, plus a second CA the broker's certificates do not come from."""

    ca: Path
    other_ca: Path
    server_cert: Path  # subjectAltName localhost, 127.0.0.1
    server_key: Path
    example_cert: Path  # subjectAltName broker.example only
    example_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSPHRASE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = openssl_ca(directory, "edge-test-ca")
    other_ca = openssl_ca(directory, "someone-elses-ca")
    server = openssl_signed(directory, ca, "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    example = openssl_signed(directory, ca, "broker.example", "subjectAltName=DNS:broker.example")
    client = openssl_signed(directory, ca, "edge-device", "extendedKeyUsage=clientAuth", passphrase=KEY_PASSPHRASE)
    return Pki(ca[0], other_ca[0], *server, *example, *client)


@dataclass(frozen=True)
class TlsBroker:
    broker: LocalBroker
    tls_port: int  # localhost's certificate, client certificate required
    example_port: int  # broker.example's certificate
    plain_port: int  # plaintext: the tests' publisher, and the never-plaintext check

    def log(self) -> str:
        return (self.broker.workdir / "broker.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    example_port, plain_port = free_port(), free_port()
    conf = f"""
cafile {pki.ca}
certfile {pki.server_cert}
keyfile {pki.server_key}
require_certificate true
listener {example_port} 127.0.0.1
cafile {pki.ca}
certfile {pki.example_cert}
keyfile {pki.example_key}
listener {plain_port} 127.0.0.1
log_type notice
"""
    with running_broker(tmp_path_factory.mktemp("tls-broker") / "broker", conf) as broker:
        yield TlsBroker(broker, broker.port, example_port, plain_port)


def tls_config(tmp_path: Path, pki: Pki, port: int, **mqtt_options: object) -> Config:
    mqtt_options = {"tls": True, "ca_file": str(pki.ca), "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **mqtt_options}
    return make_config(tmp_path, port=port, mqtt=mqtt_options, store={"flush_interval_s": 0.2, "clock_trust": "always"})


@contextlib.contextmanager
def ingesting(config: Config, wait: bool = True) -> Iterator[tuple[ReplayStore, Ingestor]]:
    """A real Ingestor and its store on `config`, started (and subscribed when `wait`)."""
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    try:
        if wait:
            assert ingestor.wait_subscribed(HANG_S), ingestor.counters()["broker"]
        yield store, ingestor
    finally:
        ingestor.stop()
        store.close()


def publish_reading(port: int, value: float = 21.5) -> None:
    """One native reading on the plaintext listener, as a sensor would send it."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-test-pub-{time.monotonic_ns()}")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        pub.publish("sensors/m1/temperature", f'{{"ts": {time.time()}, "value": {value}}}', qos=1).wait_for_publish(HANG_S)
    finally:
        pub.loop_stop()
        pub.disconnect()


def status_line(ingestor: Ingestor) -> str:
    return StatusReport(StatusParts(device="test-dev", started_unix=time.time(), uptime_s=1.0, ingest=ingestor)).line()


def client_cert_options(pki: Pki, credentials: Path) -> dict[str, object]:
    """The client certificate, its key and the key's passphrase as a service reads them: the key
    and the passphrase from $CREDENTIALS_DIRECTORY."""
    credentials.mkdir(exist_ok=True)
    shutil.copy(pki.client_key, credentials / "mqtt-client-key")
    (credentials / "mqtt-key-password").write_text(KEY_PASSPHRASE + "\n")
    return {
        "cert_file": str(pki.client_cert),
        "key_file": "${CREDENTIALS_DIRECTORY}/mqtt-client-key",
        "key_password_file": "$CREDENTIALS_DIRECTORY/mqtt-key-password",
    }


def test_readings_are_stored_over_tls_with_a_client_certificate(
    tmp_path: Path, pki: Pki, tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    config = tls_config(tmp_path, pki, tls_broker.tls_port, **client_cert_options(pki, tmp_path / "credentials"))
    with ingesting(config) as (store, ingestor):
        publish_reading(tls_broker.plain_port, 21.5)
        wait_for(lambda: store.count() == 1, HANG_S, "the reading stored", detail=ingestor.counters)
        broker = ingestor.counters()["broker"]
        assert broker == {"host": "127.0.0.1", "port": tls_broker.tls_port, "tls": True, "connected": True, "error": None}
        assert "broker" not in status_line(ingestor) and "TLS" not in status_line(ingestor)
    # The broker saw this client over TLS with its certificate (require_certificate is on).
    assert f"as {config.mqtt.client_id}" in tls_broker.log()


def test_a_wrong_ca_fails_verification_is_reported_and_nothing_is_stored(
    tmp_path: Path, pki: Pki, tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # A real daemon: the text is in the socket's `status` reply and on the STATUS= line.
    caplog.set_level(logging.DEBUG, logger="edge_daemon.mqtt.client")
    config = tls_config(tmp_path, pki, tls_broker.tls_port, ca_file=str(pki.other_ca))
    daemon = Daemon(config)
    daemon.start()
    try:
        status = wait_for(
            lambda: (s := daemon_status(config.device.socket)) and s["ingest"]["broker"]["error"] and s, HANG_S,
            "the TLS failure in status",
        )
        broker = status["ingest"]["broker"]
        assert broker["error"].startswith("TLS: certificate verify failed for 127.0.0.1 (")
        # OpenSSL's words for why: the chain ends at a CA we do not trust.
        assert any(why in broker["error"] for why in ("self-signed certificate in certificate chain", "unable to get local issuer"))
        assert (broker["connected"], broker["tls"]) == (False, True)
        assert "TLS: certificate verify failed for 127.0.0.1" in daemon.status_line()
        assert "broker unreachable" not in daemon.status_line()
        # First failure WARNING, the retries (with the back-off) DEBUG.
        wait_for(lambda: [r for r in caplog.records if r.levelno == logging.DEBUG and "certificate verify failed" in r.getMessage()],
                 HANG_S, "a retry")  # fmt: skip
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "certificate verify failed" in r.getMessage()]
        assert len(warnings) == 1
        publish_reading(tls_broker.plain_port)
    finally:
        daemon.stop()
    assert ReplayStore(config.store_path, config.store, CHANNELS).count() == 0
    # The handshake failed before any MQTT packet: the broker never saw this client connect.
    assert config.mqtt.client_id not in tls_broker.log()


def test_tls_never_falls_back_to_plaintext(tmp_path: Path, pki: Pki, tls_broker: TlsBroker) -> None:
    # TLS configured against a plaintext listener: the handshake fails, and no plaintext CONNECT
    # ever reaches the listener (it would accept one).
    config = tls_config(tmp_path, pki, tls_broker.plain_port)
    connections = f"on port {tls_broker.plain_port}"
    before = tls_broker.log().count(connections)
    with ingesting(config, wait=False) as (store, ingestor):
        wait_for(lambda: ingestor.counters()["broker"]["error"], HANG_S, "the handshake failure reported")
        assert ingestor.counters()["broker"]["error"].startswith("TLS: handshake failed with 127.0.0.1")
        assert status_line(ingestor).endswith("TLS: handshake failed with 127.0.0.1")
        # Several attempts, each a failed handshake, none a plaintext retry.
        wait_for(lambda: tls_broker.log().count(connections) >= before + 3, HANG_S, "three attempts")
        publish_reading(tls_broker.plain_port)
        assert not ingestor.connected and store.count() == 0
    assert config.mqtt.client_id not in tls_broker.log()


def test_a_wrong_host_name_fails_unless_tls_insecure(tmp_path: Path, pki: Pki, tls_broker: TlsBroker) -> None:
    # The listener's certificate names broker.example; we connect to 127.0.0.1.
    config = tls_config(tmp_path / "strict", pki, tls_broker.example_port)
    with ingesting(config, wait=False) as (store, ingestor):
        error = wait_for(lambda: ingestor.counters()["broker"]["error"], HANG_S, "the name mismatch reported")
        assert error.startswith("TLS: certificate verify failed for 127.0.0.1 (") and "mismatch" in error, error
        assert "TLS: certificate verify failed for 127.0.0.1" in status_line(ingestor)
    assert config.mqtt.client_id not in tls_broker.log()
    # tls_insecure skips the name check only: the same CA-signed certificate is accepted...
    insecure = tls_config(tmp_path / "insecure", pki, tls_broker.example_port, tls_insecure=True)
    with ingesting(insecure) as (store, ingestor):
        publish_reading(tls_broker.plain_port)
        wait_for(lambda: store.count() == 1, HANG_S, "the reading stored", detail=ingestor.counters)
    # ...and a certificate from another CA is still refused.
    untrusted = tls_config(tmp_path / "untrusted", pki, tls_broker.example_port, tls_insecure=True, ca_file=str(pki.other_ca))
    with ingesting(untrusted, wait=False) as (store, ingestor):
        error = wait_for(lambda: ingestor.counters()["broker"]["error"], HANG_S, "the CA failure reported")
        assert "certificate verify failed" in error and "mismatch" not in error, error


def test_password_file_against_a_broker_with_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "edge", "s3cret pass"], check=True, capture_output=True)
    passwords.chmod(0o600)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("s3cret pass\n")  # `echo` style: the newline is not part of it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with running_broker(tmp_path / "broker", f"allow_anonymous false\npassword_file {passwords}\n") as broker:
        def config(name: str, **mqtt_options: object) -> Config:
            options = {"username": "edge", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **mqtt_options}
            return make_config(tmp_path / name, port=broker.port, mqtt=options)

        with ingesting(config("right", password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")) as (_, ingestor):
            assert ingestor.connected
        # A wrong password: refused by the broker, said so, and the secret is in no report.
        (credentials / "wrong").write_text("guess\n")
        with ingesting(config("wrong", password_file=str(credentials / "wrong")), wait=False) as (_, ingestor):
            error = wait_for(lambda: ingestor.counters()["broker"]["error"], HANG_S, "the refusal reported")
            assert error.startswith("broker refused the connection") and "guess" not in error
            assert status_line(ingestor).startswith("broker refused the connection")
    # Missing file, unset $CREDENTIALS_DIRECTORY: a config error naming the key, at start.
    store = ReplayStore(tmp_path / "store.db", make_config(tmp_path).store, CHANNELS)
    try:
        missing = make_config(tmp_path, mqtt={"password_file": str(credentials / "nope")})
        with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read .*nope: No such file"):
            Ingestor(missing, store)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        unset = make_config(tmp_path, mqtt={"password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"})
        with pytest.raises(ConfigError, match=r"mqtt\.password_file: .*CREDENTIALS_DIRECTORY, which is not set"):
            Ingestor(unset, store)
    finally:
        store.close()
    with pytest.raises(ConfigError, match="exclusive"):
        make_config(tmp_path, mqtt={"password": "x", "password_file": "/x"})


def test_key_problems_are_config_errors_naming_the_key(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    options = client_cert_options(pki, tmp_path / "credentials")
    store = ReplayStore(tmp_path / "store.db", make_config(tmp_path).store, CHANNELS)
    try:
        (tmp_path / "credentials" / "mqtt-key-password").write_text("not the passphrase\n")
        with pytest.raises(ConfigError, match=r"mqtt\.key_file: cannot load .*wrong key_password_file"):
            Ingestor(tls_config(tmp_path, pki, 8883, **options), store)
        with pytest.raises(ConfigError, match=r"mqtt\.ca_file: cannot read .*missing-ca\.crt"):
            Ingestor(tls_config(tmp_path, pki, 8883, ca_file=str(tmp_path / "missing-ca.crt")), store)
    finally:
        store.close()
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        tls_config(tmp_path, pki, 8883, cert_file=str(pki.client_cert))
    with pytest.raises(ConfigError, match="ca_file set but tls = false"):
        make_config(tmp_path, mqtt={"ca_file": str(pki.ca)})


def test_validate_config_warns_about_secrets_others_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("hunter2\n")
    password_file.chmod(0o644)
    base = {
        "device": {"id": "pump-07", "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")},
        "channels": {"names": CHANNELS},
    }
    config = tmp_path / "config.toml"

    def validate(mqtt_section: dict[str, object], mode: int = 0o640) -> tuple[int, str]:
        config.write_text(config_toml({"device": base["device"], "mqtt": mqtt_section, "channels": base["channels"]}))
        config.chmod(mode)
        code = cli_main(["validate-config", str(config)])
        out = capsys.readouterr()
        assert "hunter2" not in out.out + out.err
        return code, out.err

    code, err = validate({"username": "edge", "password_file": str(password_file)})
    assert code == 0 and f"mqtt.password_file: {password_file} holds a secret and is readable by every user (mode 0644)" in err
    password_file.chmod(0o600)
    assert validate({"username": "edge", "password_file": str(password_file)}) == (0, "")
    # Group-readable by a group that is neither root's nor the service's.
    if os.geteuid() == 0:
        os.chown(password_file, 0, 65534)
        password_file.chmod(0o640)
        code, err = validate({"username": "edge", "password_file": str(password_file)})
        assert code == 0 and "readable by group" in err and "not only the service's group edge-daemon" in err
        os.chown(password_file, 0, 0)
        password_file.chmod(0o600)
    # An inline password in a world-readable config.
    code, err = validate({"username": "edge", "password": "hunter2"}, mode=0o644)
    assert code == 0 and f"{config} holds mqtt.password and is readable by every user" in err
    assert validate({"username": "edge", "password": "hunter2"}, mode=0o640) == (0, "")
    # A missing file is reported too.
    code, err = validate({"username": "edge", "password_file": str(tmp_path / "gone")})
    assert code == 0 and f"mqtt.password_file: cannot read {tmp_path / 'gone'}" in err


def test_a_broker_wanting_a_client_certificate_is_reported(tmp_path: Path, pki: Pki, tls_broker: TlsBroker) -> None:
    # require_certificate on the listener and none configured: TLS 1.3 says so after the handshake.
    config = tls_config(tmp_path, pki, tls_broker.tls_port)
    with ingesting(config, wait=False) as (store, ingestor):
        error = wait_for(lambda: ingestor.counters()["broker"]["error"], HANG_S, "the refusal reported")
        assert error.startswith("TLS: 127.0.0.1 closed the connection") and "client certificate" in error, error
        assert status_line(ingestor) == "TLS: 127.0.0.1 closed the connection"
