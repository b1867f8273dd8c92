"""The broker connection's secrets and TLS: files named in `[mqtt]` (with `$CREDENTIALS_DIRECTORY`
expanded), the secrets read from them at start, the TLS context built from them, the words a TLS
failure is reported in, and the permission check `validate-config` runs on secret files.

A secret's value is never logged or put in an error message: only the key and the file's path.
"""

from __future__ import annotations

import grp
import os
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt_client

from edge_daemon.config import MqttConfig
from edge_daemon.errors import ConfigError

# systemd sets it for a unit with LoadCredential=: the private, read-only directory holding them.
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
_CREDENTIALS_REF = re.compile(r"\$(\{CREDENTIALS_DIRECTORY\}|CREDENTIALS_DIRECTORY\b)")
# The group the service runs as (the unit's Group=), which may read the config and secrets.
SERVICE_GROUP = "edge-daemon"
# The `[mqtt]` keys naming files, in the order they are checked; those holding a secret.
FILE_KEYS = ("password_file", "ca_file", "cert_file", "key_file", "key_password_file")
SECRET_FILE_KEYS = ("password_file", "key_file", "key_password_file")


def expand_path(key: str, raw: str, environ: Mapping[str, str] | None = None) -> Path:
    """`raw` with `$CREDENTIALS_DIRECTORY` / `${CREDENTIALS_DIRECTORY}` replaced from the environment;
    ConfigError naming `mqtt.<key>` when the variable is needed but unset."""
    env = os.environ if environ is None else environ
    if _CREDENTIALS_REF.search(raw) is None:
        return Path(raw)
    directory = env.get(CREDENTIALS_VARIABLE)
    if not directory:
        message = (
            f"{raw} needs ${CREDENTIALS_VARIABLE}, which is not set: systemd sets it for the service from its "
            "LoadCredential= lines; outside the service, give the file's own path"
        )
        raise ConfigError(f"mqtt.{key}: {message}", [(f"mqtt.{key}", message)])
    return Path(_CREDENTIALS_REF.sub(lambda _: directory, raw))


def _unreadable(key: str, path: Path, exc: OSError) -> ConfigError:
    message = f"cannot read {path}: {exc.strerror or exc}"
    return ConfigError(f"mqtt.{key}: {message}", [(f"mqtt.{key}", message)])


def read_secret(key: str, raw: str, environ: Mapping[str, str] | None = None) -> str:
    """The secret held in the file `mqtt.<key>` names, without its trailing newline."""
    path = expand_path(key, raw, environ)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _unreadable(key, path, exc) from None
    except UnicodeDecodeError:
        message = f"{path} is not UTF-8 text"
        raise ConfigError(f"mqtt.{key}: {message}", [(f"mqtt.{key}", message)]) from None
    # `echo secret > file` and editors add one; a password never ends in a newline.
    secret = text[:-1] if text.endswith("\n") else text
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        message = f"{path} is empty"
        raise ConfigError(f"mqtt.{key}: {message}", [(f"mqtt.{key}", message)])
    return secret


def readable_path(key: str, raw: str, environ: Mapping[str, str] | None = None) -> Path:
    """The expanded path of a certificate or key file, checked to be readable now."""
    path = expand_path(key, raw, environ)
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise _unreadable(key, path, exc) from None
    return path


@dataclass(frozen=True)
class MqttSecrets:
    """What the connection needs from `[mqtt]`'s files, read once at start."""

    password: str | None
    ssl_context: ssl.SSLContext | None  # None: plaintext (tls = false)


def load_secrets(mqtt: MqttConfig, environ: Mapping[str, str] | None = None) -> MqttSecrets:
    """Read the password and key files and build the TLS context: ConfigError naming the key on
    a missing or unreadable file, an unset `$CREDENTIALS_DIRECTORY`, or a key that does not load."""
    password = mqtt.password
    if mqtt.password_file is not None:
        password = read_secret("password_file", mqtt.password_file, environ)
    return MqttSecrets(password, tls_context(mqtt, environ) if mqtt.tls else None)


def configure_client(client: mqtt_client.Client, mqtt: MqttConfig, environ: Mapping[str, str] | None = None) -> None:
    """Give a paho client `[mqtt]`'s user name, password and TLS (read as `load_secrets` does): the
    daemon's connection and any short one of its own (removing a discovery config) alike."""
    secrets = load_secrets(mqtt, environ)
    if mqtt.username:
        client.username_pw_set(mqtt.username, secrets.password)
    if secrets.ssl_context is not None:
        # The context carries CERT_REQUIRED and check_hostname (off only with tls_insecure);
        # paho takes its insecure flag from the context, set here again to say so.
        client.tls_set_context(secrets.ssl_context)
        client.tls_insecure_set(mqtt.tls_insecure)


def tls_context(mqtt: MqttConfig, environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """A client context: the broker's certificate checked against `ca_file` (else the system's
    CAs) and, unless `tls_insecure`, against `host`; the client certificate when configured."""
    ca_file = readable_path("ca_file", mqtt.ca_file, environ) if mqtt.ca_file else None
    try:
        # TLS 1.2 or later, CERT_REQUIRED and host name checking: the library's secure defaults.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, ValueError) as exc:
        message = f"{ca_file}: no CA certificate could be loaded ({exc})"
        raise ConfigError(f"mqtt.ca_file: {message}", [("mqtt.ca_file", message)]) from None
    if mqtt.cert_file is not None and mqtt.key_file is not None:
        cert_file = readable_path("cert_file", mqtt.cert_file, environ)
        key_file = readable_path("key_file", mqtt.key_file, environ)
        key_password = read_secret("key_password_file", mqtt.key_password_file, environ) if mqtt.key_password_file else None
        try:
            # An empty passphrase for an encrypted key fails here instead of prompting on a terminal.
            context.load_cert_chain(str(cert_file), str(key_file), password=key_password or "")
        except ssl.SSLError as exc:
            hint = "wrong key_password_file, or the key does not match cert_file" if key_password else (
                "an encrypted key needs key_password_file, or the key does not match cert_file"
            )
            message = f"cannot load {cert_file} with {key_file}: {exc.reason or exc} ({hint})"
            raise ConfigError(f"mqtt.key_file: {message}", [("mqtt.key_file", message)]) from None
    # Still CA-checked: only the broker's name is not compared with `host`.
    context.check_hostname = not mqtt.tls_insecure
    return context


def describe_connect_error(exc: BaseException | None, host: str, port: int, tls: bool) -> tuple[str, str]:
    """(short, detail) words for a failed connect: the short one goes on the STATUS= line
    ("TLS: certificate verify failed for <host>"), the detail in `status` and the log."""
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        short = f"TLS: certificate verify failed for {host}"
        return short, f"{short} ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, (ConnectionResetError, EOFError))):
        reason = getattr(exc, "reason", None) or type(exc).__name__
        short = f"TLS: handshake failed with {host}"
        return short, f"{short} ({reason}; is {where} a TLS listener?)"
    if isinstance(exc, OSError):
        return "broker unreachable", f"cannot connect to broker {where}: {exc.strerror or exc}"
    return "broker unreachable", f"cannot connect to broker {where}"


# -- permission checks (validate-config) ----------------------------------------------------------


def _service_gid() -> int | None:
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def exposure(path: Path) -> str | None:
    """Who besides its owner (and the service's group) can read `path`, or None."""
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o004:
        return f"readable by every user (mode {mode:04o})"
    if mode & 0o040 and st.st_gid not in (0, _service_gid()):
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return f"readable by group {group} (mode {mode:04o}), not only the service's group {SERVICE_GROUP}"
    return None


def secret_file_warnings(mqtt: MqttConfig, config_path: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings about files holding a secret that others can read, and about files named in
    `[mqtt]` that are missing or unreadable (a `$CREDENTIALS_DIRECTORY` path outside the service
    cannot be checked: said so)."""
    warnings: list[str] = []
    if mqtt.password is not None:
        problem = exposure(config_path)
        if problem:
            warnings.append(
                f"{config_path} holds mqtt.password and is {problem}: move the password to password_file, "
                "or chmod 0640 / chown root:edge-daemon the config"
            )
    for key in FILE_KEYS:
        raw = getattr(mqtt, key)
        if raw is None:
            continue
        try:
            path = expand_path(key, raw, environ)
        except ConfigError:
            warnings.append(
                f"mqtt.{key}: {raw} is read from ${CREDENTIALS_VARIABLE}, which only the service has: not checked here"
            )
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            warnings.append(f"mqtt.{key}: cannot read {path}: {exc.strerror or exc}")
            continue
        if key in SECRET_FILE_KEYS:
            problem = exposure(path)
            if problem:
                warnings.append(f"mqtt.{key}: {path} holds a secret and is {problem}: chmod 0600 (or 0640 root:edge-daemon)")
    return warnings
