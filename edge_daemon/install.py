"""Install and uninstall edge-daemon as a systemd service.

Owns the on-device layout: a virtual environment under /opt, the unit in
/etc/systemd/system, the default config (never overwritten; 0640
root:edge-daemon, with the system user and group edge-daemon the service runs
as), the MQTT password in systemd's credential store, and the state that
uninstall keeps unless asked to purge. Standard library only, so the
system python3 can run it from a source tree (scripts/install).

The unit and the default config are package data (edge_daemon/data/), so an
edge-daemon installed from a wheel into a venv installs the service too: the
service then runs from that venv. From a source tree the installer creates
the venv itself, with the CPU torch pin from constraints.txt.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_daemon.artifacts.files import replace_atomically
from edge_daemon.errors import EdgeDaemonError, InstallError

log = logging.getLogger(__name__)

UNIT_NAME = "edge-daemon.service"
DEFAULT_VENV = Path("/opt/edge-daemon/venv")
UNIT_DIR = Path("/etc/systemd/system")
CONFIG_PATH = Path("/etc/edge-daemon/config.toml")
# The unit's User=/Group=: a system user of this name makes systemd use it instead of a dynamic
# one, so the config can be readable by the service and no one else.
SERVICE_USER = "edge-daemon"
CONFIG_MODE = 0o640
# systemd's credential store, searched by the unit's `LoadCredential=mqtt-password:<file>`.
CREDSTORE_DIR = Path("/etc/credstore")
MQTT_PASSWORD_CREDENTIAL = "edge-daemon.mqtt-password"
# Every credential the unit loads from the store (uninstall --purge removes them).
CREDENTIALS = (MQTT_PASSWORD_CREDENTIAL, "edge-daemon.mqtt-key-password", "edge-daemon.mqtt-client-key")
# DynamicUser= keeps the real directories under private/ and links them from
# the usual place; both forms are removed together.
STATE_DIRS = (Path("/var/lib/edge-daemon"), Path("/var/lib/private/edge-daemon"))
CACHE_DIRS = (Path("/var/cache/edge-daemon"), Path("/var/cache/private/edge-daemon"))
DATA_DIR = Path(__file__).resolve().parent / "data"
# The device id in the default config.toml; the installer replaces it with the
# host name, since two devices sharing an MQTT client id keep kicking each
# other off the broker.
TEMPLATE_DEVICE_ID = "edge-device"
_EXEC_START_VENV = "/opt/edge-daemon/venv"


@dataclass(frozen=True)
class InstallResult:
    """What install() did; paths are as written (under the prefix)."""

    unit: Path
    config: Path
    config_written: bool  # False: an existing config was kept untouched
    config_group: str | None  # the config's group when set to the service's, else None (left root's)
    mqtt_password: Path | None  # where --mqtt-password-file was copied (the credential store)
    venv: Path | None  # None: venv creation was skipped
    systemctl_ran: bool  # daemon-reload + enable --now


@dataclass(frozen=True)
class UninstallResult:
    """What uninstall() removed and what it deliberately kept."""

    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    systemctl_ran: bool = False


def credential_id(name: str) -> str:
    """The id the unit loads a credential store file as (`LoadCredential=<id>:<name>`): the name
    without the service's prefix, e.g. mqtt-password."""
    return name.removeprefix("edge-daemon.")


def project_dir() -> Path:
    """Where a source tree holding this module would be (it may be site-packages instead)."""
    return Path(__file__).resolve().parents[1]


def is_source_tree(path: Path) -> bool:
    """Whether `path` is an edge-daemon source tree pip can install from."""
    path = Path(path)
    return (path / "pyproject.toml").is_file() and (path / "constraints.txt").is_file() and (path / "edge_daemon").is_dir()


def running_venv() -> Path:
    """The virtual environment this edge-daemon runs from (installed from a wheel)."""
    if sys.prefix == sys.base_prefix:
        raise InstallError(
            "edge-daemon runs neither from a source tree nor from a virtual environment: install it into a "
            "venv (pip install -c constraints.txt torch==<pin> edge_daemon-*.whl) and run that venv's "
            "edge-daemon install, or pass --source with a source tree"
        )
    return Path(sys.prefix)


def systemd_running() -> bool:
    """sd_booted(): whether systemd is PID 1 here, so systemctl can act."""
    return Path("/run/systemd/system").is_dir()


def under(prefix: Path, path: Path) -> Path:
    """`path` (absolute, as on the device) placed under `prefix`."""
    return Path(prefix) / Path(path).relative_to("/")


def device_id_from_hostname(hostname: str | None = None) -> str:
    """A valid [device] id from the host name (falls back to the template id)."""
    name = socket.gethostname() if hostname is None else hostname
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.split(".")[0]).strip("-")[:64]
    return name or TEMPLATE_DEVICE_ID


def render_unit(venv_dir: Path = DEFAULT_VENV) -> str:
    """The unit file text, with ExecStart pointing into `venv_dir`."""
    text = _read(DATA_DIR / UNIT_NAME)
    venv_dir = Path(venv_dir)
    if not venv_dir.is_absolute():
        raise InstallError(f"venv directory must be absolute, got {venv_dir}")
    if str(venv_dir) != _EXEC_START_VENV:
        text = text.replace(f"ExecStart={_EXEC_START_VENV}/", f"ExecStart={venv_dir}/")
    return text


def render_config(device_id: str | None = None) -> str:
    """The default config text with this device's id filled in."""
    text = _read(DATA_DIR / "config.toml")
    device_id = device_id_from_hostname() if device_id is None else device_id
    return text.replace(f'id = "{TEMPLATE_DEVICE_ID}"', f'id = "{device_id}"', 1)


def torch_pin(source: Path) -> str:
    """The `torch==X` requirement from constraints.txt (the CPU build)."""
    for line in _read(Path(source) / "constraints.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(r"^torch\s*==", line):
            return line.replace(" ", "")
    raise InstallError(f"{source}/constraints.txt pins no torch version")


def create_venv(venv_path: Path, source: Path, python: str = sys.executable) -> Path:
    """Create (or reuse) a venv at `venv_path` and install the package from `source` into it.

    torch goes first with the pin from constraints.txt, so nothing later can
    resolve it to a multi-GB CUDA build. The package itself is a regular
    (not editable) install: the service must not depend on the source tree.
    """
    venv_path = Path(venv_path)
    source = Path(source)
    constraints = source / "constraints.txt"
    venv_python = venv_path / "bin" / "python"
    if not venv_python.exists():
        log.info("creating virtual environment %s", venv_path)
        _run([python, "-m", "venv", str(venv_path)])
    pip = [str(venv_python), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    log.info("installing %s into %s (several minutes on a small device)", torch_pin(source), venv_path)
    _run([*pip, torch_pin(source)])
    log.info("installing edge-daemon from %s", source)
    _run([*pip, str(source)])
    entry = venv_path / "bin" / "edge-daemon"
    if not entry.exists():
        raise InstallError(f"{entry} missing after installing the package")
    return venv_path


def install(
    prefix: Path = Path("/"),
    venv_dir: Path | str = DEFAULT_VENV,
    source: Path | None = None,
    systemctl: bool = True,
    with_venv: bool = True,
    device_id: str | None = None,
    mqtt_password_file: Path | None = None,
) -> InstallResult:
    """Install the service under `prefix` (a temporary root in tests, / on a device).

    Writes the unit (replacing an older one: local changes belong in
    `systemctl edit` drop-ins) and the default config only if none exists,
    mode 0640 and, once the system group edge-daemon exists (created here
    at /), group edge-daemon. `mqtt_password_file` is copied into the
    credential store (0600 root) that the unit's LoadCredential= reads.
    `systemctl daemon-reload` and `enable --now` run only when `systemctl` is
    True, `prefix` is / and systemd is running. `with_venv=False` skips
    the venv (tests, or a venv provisioned another way).
    """
    prefix = Path(prefix)
    venv_dir = Path(venv_dir)
    at_root = prefix.resolve() == Path("/")
    if at_root and os.geteuid() != 0:
        raise InstallError("installing to / needs root (try sudo)")
    if source is not None:
        source = Path(source)
        if not is_source_tree(source):
            raise InstallError(f"{source} is not an edge-daemon source tree (no pyproject.toml, constraints.txt, edge_daemon/)")
    elif is_source_tree(project_dir()):
        source = project_dir()
    elif with_venv:
        # Installed from a wheel: the venv exists already and the service runs from it.
        running = running_venv()
        if venv_dir != DEFAULT_VENV and venv_dir.resolve() != running.resolve():
            raise InstallError(
                f"--venv {venv_dir}: this edge-daemon runs from {running}, so the service would run from there; "
                f"drop --venv, or add --no-venv if {venv_dir} is provisioned another way"
            )
        venv_dir, with_venv = running, False
        log.info("edge-daemon is installed in %s: the service runs from that venv", venv_dir)
    unit_text = render_unit(venv_dir)  # read everything before touching the target
    config_text = render_config(device_id)
    password = _read_password_file(mqtt_password_file) if mqtt_password_file is not None else None

    venv_path: Path | None = None
    if with_venv:
        assert source is not None
        venv_path = create_venv(under(prefix, venv_dir), source)

    unit_path = under(prefix, UNIT_DIR / UNIT_NAME)
    replace_atomically(unit_path, unit_text, 0o644)  # systemd never reads a half-written unit
    log.info("wrote %s", unit_path)

    if at_root:
        ensure_service_user()
    config_path = under(prefix, CONFIG_PATH)
    config_written = _write_new(config_path, config_text, CONFIG_MODE)
    config_group = None
    if config_written:
        config_group = _give_to_service_group(config_path)
        log.info("wrote default config %s", config_path)
    else:
        log.info("kept existing config %s", config_path)

    password_path = None
    if password is not None:
        password_path = under(prefix, CREDSTORE_DIR / MQTT_PASSWORD_CREDENTIAL)
        password_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(password_path.parent, 0o700)
        replace_atomically(password_path, password, 0o600)
        log.info(
            'wrote %s: the service reads it as password_file = "${CREDENTIALS_DIRECTORY}/mqtt-password" '
            "(set that and username in [mqtt])", password_path,
        )

    ran = False
    if systemctl and at_root and systemd_running():
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", "--now", UNIT_NAME])
        ran = True
    elif systemctl:
        log.info("not running systemctl: %s", "prefix is not /" if not at_root else "systemd is not running")
    return InstallResult(unit_path, config_path, config_written, config_group, password_path, venv_path, ran)


def ensure_service_user() -> None:
    """Create the system user and group edge-daemon (no home, no login) unless they exist."""
    try:
        grp.getgrnam(SERVICE_USER)
        return
    except KeyError:
        pass
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
          "--shell", "/usr/sbin/nologin", "--comment", "edge-daemon service", SERVICE_USER])  # fmt: skip
    log.info("created system user and group %s", SERVICE_USER)


def _give_to_service_group(path: Path) -> str | None:
    """chown root:edge-daemon when that group exists and we may; else say what to do."""
    try:
        gid = grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        log.warning(
            "no group %s here: %s stays root's, unreadable by the service until "
            "`chown root:%s` (installing to / creates the group)", SERVICE_USER, path, SERVICE_USER,
        )
        return None
    try:
        os.chown(path, 0, gid)
    except PermissionError:
        log.warning("cannot chown %s to root:%s (not root): do it before starting the service", path, SERVICE_USER)
        return None
    return SERVICE_USER


def _read_password_file(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"--mqtt-password-file {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip("\r\n"):
        raise InstallError(f"--mqtt-password-file {path} is empty")
    return text


def uninstall(
    prefix: Path = Path("/"),
    purge: bool = False,
    venv_dir: Path | str = DEFAULT_VENV,
    systemctl: bool = True,
) -> UninstallResult:
    """Stop and remove the service and its venv; keep state and config unless `purge`.

    Caches are always removed (they are rebuilt on demand); `purge` also
    removes the state directory (store, base model, adapters), the config,
    the service's credentials in /etc/credstore and any `systemctl edit`
    drop-ins. The system user edge-daemon stays (files may still be its).
    """
    prefix = Path(prefix)
    at_root = prefix.resolve() == Path("/")
    if at_root and os.geteuid() != 0:
        raise InstallError("uninstalling from / needs root (try sudo)")
    removed: list[Path] = []
    kept: list[Path] = []
    ran = False
    if systemctl and at_root and systemd_running():
        # Not fatal if the unit was never loaded: the files still go.
        _run(["systemctl", "disable", "--now", UNIT_NAME], check=False)
        ran = True

    unit_dir = under(prefix, UNIT_DIR)
    targets = [unit_dir / UNIT_NAME, unit_dir / "multi-user.target.wants" / UNIT_NAME]
    targets += [under(prefix, p) for p in CACHE_DIRS]
    venv_path = under(prefix, Path(venv_dir))
    if venv_path.exists() and not (venv_path / "pyvenv.cfg").exists():
        # Guard against a mistyped --venv pointing at something precious.
        raise InstallError(f"{venv_path} is not a virtual environment (no pyvenv.cfg); not removing it")
    targets.append(venv_path)
    data = [under(prefix, p) for p in STATE_DIRS] + [under(prefix, CONFIG_PATH.parent), unit_dir / f"{UNIT_NAME}.d"]
    data += [under(prefix, CREDSTORE_DIR / name) for name in CREDENTIALS]
    if purge:
        # While the config and the state (which remembers what was published) are still there.
        _remove_discovery(prefix)
        targets += data
    else:
        kept += [p for p in data if p.exists() or p.is_symlink()]

    for path in targets:
        if _remove(path):
            removed.append(path)
            log.info("removed %s", path)
    # /opt/edge-daemon goes too once the venv was its only content (only a
    # directory of our own name: never /opt or the prefix itself).
    venv_parent = venv_path.parent
    if venv_parent.name == "edge-daemon" and venv_parent.is_dir() and not any(venv_parent.iterdir()):
        venv_parent.rmdir()
        removed.append(venv_parent)
    if ran:
        _run(["systemctl", "daemon-reload"], check=False)
    for path in kept:
        log.info("kept %s (uninstall --purge removes it)", path)
    return UninstallResult(removed, kept, ran)


def _remove_discovery(prefix: Path) -> None:
    """Remove the Home Assistant discovery config the daemon published (an empty retained message on
    its topic, over the config's broker settings); a broker out of reach is reported, not fatal."""
    config_path = under(prefix, CONFIG_PATH)
    if not config_path.is_file():
        return
    # Not standard library: without them (the system python3 of a source tree) this step is skipped.
    try:
        from edge_daemon.config import load_config
        from edge_daemon.homeassistant import remove_published
    except ImportError as exc:
        log.warning("not removing any Home Assistant discovery config (%s); "
                    "an empty retained message on <prefix>/device/<device id>/config removes it", exc)  # fmt: skip
        return
    try:
        config = load_config(config_path)
        state_dir = config.device.state_dir
        # The broker password and key files as the service sees them: a config naming
        # ${CREDENTIALS_DIRECTORY}/<id> reads the credential store's file the unit loads as <id>.
        with tempfile.TemporaryDirectory() as credentials:
            for name in CREDENTIALS:
                (Path(credentials) / credential_id(name)).symlink_to(under(prefix, CREDSTORE_DIR / name))
            environ = {**os.environ, "CREDENTIALS_DIRECTORY": credentials}
            removed = remove_published(config, state_dir=under(prefix, state_dir) if state_dir.is_absolute() else state_dir, environ=environ)
    except EdgeDaemonError as exc:
        log.warning("%s; uninstalling anyway", exc)
        return
    for topic in removed:
        log.info("removed the Home Assistant discovery config on %s", topic)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from None


def _write_new(path: Path, text: str, mode: int) -> bool:
    """Create `path` with `text`; False (and nothing written) if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: an existing config is never overwritten, even by a racing install.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have narrowed it
    return True


def _remove(path: Path) -> bool:
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True)
    except OSError as exc:
        raise InstallError(f"cannot run {cmd[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        message = f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        if check:
            raise InstallError(message)
        log.warning("%s", message)
    return proc


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of `install` or `uninstall` (also used by the `edge-daemon` CLI)."""
    verb = "install under" if command == "install" else "remove from"
    parser.add_argument("--prefix", type=Path, default=Path("/"), help=f"{verb} this root (default /)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"venv path on the device (default {DEFAULT_VENV})")
    parser.add_argument("--no-systemctl", action="store_true", help="do not run systemctl")
    if command == "install":
        parser.add_argument("--source", type=Path, default=None,
                            help="source tree to build the venv from (default: this one; installed from a wheel: the venv it runs from)")  # fmt: skip
        parser.add_argument("--no-venv", action="store_true", help="skip creating the venv (it exists or is managed elsewhere)")
        parser.add_argument("--device-id", default=None, help="[device] id for a new config (default: host name)")
        parser.add_argument("--mqtt-password-file", type=Path, default=None,
                            help="copy this file to /etc/credstore/edge-daemon.mqtt-password (0600), the broker "
                            "password the unit passes as ${CREDENTIALS_DIRECTORY}/mqtt-password")  # fmt: skip
    else:
        parser.add_argument("--purge", action="store_true", help="also remove state (store, models, adapters) and the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-daemon",
        description="Install or remove the edge-daemon systemd service.",
        epilog="examples:\n  sudo edge-daemon install\n  edge-daemon install --prefix /tmp/root --no-venv\n"
        "  sudo edge-daemon install --mqtt-password-file ./mqtt-password\n"
        "  sudo edge-daemon uninstall            # keeps /var/lib/edge-daemon and the config\n"
        "  sudo edge-daemon uninstall --purge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("install", help="venv under /opt, unit, default config; enable and start"), "install")
    add_arguments(sub.add_parser("uninstall", help="stop and remove the service; keep data unless --purge"), "uninstall")
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out parsed `install` / `uninstall` options; returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "install":
            res = install(
                prefix=args.prefix,
                venv_dir=args.venv,
                source=args.source,
                systemctl=not args.no_systemctl,
                with_venv=not args.no_venv,
                device_id=args.device_id,
                mqtt_password_file=args.mqtt_password_file,
            )
            if not res.systemctl_ran and args.prefix.resolve() == Path("/"):
                log.info("start it with: systemctl daemon-reload && systemctl enable --now %s", UNIT_NAME)
        else:
            uninstall(prefix=args.prefix, purge=args.purge, venv_dir=args.venv, systemctl=not args.no_systemctl)
    except InstallError as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`install ...` or `uninstall ...`; returns the exit code."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
