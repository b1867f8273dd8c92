"""Install into a temporary root and uninstall: file layout, config never overwritten, purge."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from edge_daemon import install as inst
from edge_daemon.config import load_config
from edge_daemon.errors import InstallError

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fake_deployment(prefix: Path) -> dict[str, Path]:
    """What a running service leaves behind: DynamicUser state, a cache, a venv, a drop-in."""
    private = prefix / "var/lib/private/edge-daemon"
    (private / "adapters/v1").mkdir(parents=True)
    (private / "store.db").write_bytes(b"SQLite format 3\x00")
    (prefix / "var/lib/edge-daemon").symlink_to("private/edge-daemon")
    cache = prefix / "var/cache/private/edge-daemon"
    cache.mkdir(parents=True)
    (prefix / "var/cache/edge-daemon").symlink_to("private/edge-daemon")
    venv = prefix / "opt/edge-daemon/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    dropin = prefix / "etc/systemd/system/edge-daemon.service.d"
    dropin.mkdir(parents=True)
    (dropin / "override.conf").write_text("[Service]\nMemoryMax=2G\n")
    wants = prefix / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "edge-daemon.service").symlink_to("/etc/systemd/system/edge-daemon.service")
    return {"private": private, "venv": venv, "cache": cache, "dropin": dropin, "wants": wants / "edge-daemon.service"}


def test_install_layout(tmp_path: Path) -> None:
    res = inst.install(prefix=tmp_path, with_venv=False, device_id="pump-07")
    unit = tmp_path / "etc/systemd/system/edge-daemon.service"
    config = tmp_path / "etc/edge-daemon/config.toml"
    assert (res.unit, res.config, res.config_written, res.venv, res.systemctl_ran) == (unit, config, True, None, False)
    assert unit.read_text() == (ROOT / "systemd/edge-daemon.service").read_text()
    # The config may hold a password: readable by root and the service's group only.
    assert _mode(unit) == 0o644 and _mode(config) == 0o640
    assert res.mqtt_password is None and not (tmp_path / "etc/credstore").exists()
    loaded = load_config(config)
    assert loaded.device.id == "pump-07"
    assert loaded.mqtt.client_id == "edge-daemon-pump-07"
    # Nothing else: no stray temp files next to the unit.
    assert sorted(p.name for p in unit.parent.iterdir()) == ["edge-daemon.service"]


def test_device_id_defaults_to_a_sanitised_host_name(tmp_path: Path) -> None:
    assert inst.device_id_from_hostname("Pump 07.plant.example") == "Pump-07"
    assert inst.device_id_from_hostname("...") == inst.TEMPLATE_DEVICE_ID
    inst.install(prefix=tmp_path, with_venv=False)
    assert load_config(tmp_path / "etc/edge-daemon/config.toml").device.id == inst.device_id_from_hostname()


def test_reinstall_never_overwrites_the_config(tmp_path: Path) -> None:
    inst.install(prefix=tmp_path, with_venv=False, device_id="pump-07")
    config = tmp_path / "etc/edge-daemon/config.toml"
    edited = config.read_text().replace('host = "127.0.0.1"', 'host = "10.0.0.5"')
    config.write_text(edited)
    unit = tmp_path / "etc/systemd/system/edge-daemon.service"
    unit.write_text("stale unit from an older release\n")

    res = inst.install(prefix=tmp_path, with_venv=False, device_id="other")
    assert res.config_written is False
    assert config.read_text() == edited
    # The unit is ours and is replaced (local changes belong in drop-ins).
    assert unit.read_text() == (ROOT / "systemd/edge-daemon.service").read_text()


def test_custom_venv_rewrites_exec_start(tmp_path: Path) -> None:
    inst.install(prefix=tmp_path, venv_dir="/srv/ed/venv", with_venv=False)
    text = (tmp_path / "etc/systemd/system/edge-daemon.service").read_text()
    assert "ExecStart=/srv/ed/venv/bin/edge-daemon run --config /etc/edge-daemon/config.toml" in text
    assert "/opt/edge-daemon/venv" not in text.split("[Service]")[1].split("ExecStart=")[1].splitlines()[0]
    with pytest.raises(InstallError):
        inst.install(prefix=tmp_path, venv_dir="relative/venv", with_venv=False)


def test_uninstall_keeps_data_and_config(tmp_path: Path) -> None:
    inst.install(prefix=tmp_path, with_venv=False, device_id="pump-07")
    parts = _fake_deployment(tmp_path)
    config = tmp_path / "etc/edge-daemon/config.toml"

    res = inst.uninstall(prefix=tmp_path)
    assert not (tmp_path / "etc/systemd/system/edge-daemon.service").exists()
    assert not parts["wants"].is_symlink()
    assert not (tmp_path / "opt/edge-daemon").exists()  # venv and its now-empty parent
    assert not parts["cache"].exists() and not (tmp_path / "var/cache/edge-daemon").is_symlink()
    # Kept: the store, adapters, config and the admin's drop-in.
    assert (tmp_path / "var/lib/edge-daemon/store.db").read_bytes().startswith(b"SQLite format 3")
    assert (parts["private"] / "adapters/v1").is_dir()
    assert load_config(config).device.id == "pump-07"
    assert (parts["dropin"] / "override.conf").exists()
    assert set(res.kept) == {
        tmp_path / "var/lib/edge-daemon", parts["private"], config.parent, parts["dropin"],
    }
    assert tmp_path / "opt/edge-daemon/venv" in res.removed and res.systemctl_ran is False

    # Reinstalling after an uninstall finds the old config and keeps it.
    assert inst.install(prefix=tmp_path, with_venv=False).config_written is False


def test_uninstall_purge_removes_state(tmp_path: Path) -> None:
    inst.install(prefix=tmp_path, with_venv=False)
    parts = _fake_deployment(tmp_path)
    res = inst.uninstall(prefix=tmp_path, purge=True)
    for gone in (tmp_path / "var/lib/edge-daemon", parts["private"], tmp_path / "etc/edge-daemon", parts["dropin"]):
        assert not gone.exists() and not gone.is_symlink(), gone
    assert res.kept == []
    # Only our own directories went; their parents stay.
    assert (tmp_path / "var/lib/private").is_dir() and (tmp_path / "etc/systemd/system").is_dir()


def test_uninstall_refuses_a_venv_path_that_is_not_a_venv(tmp_path: Path) -> None:
    precious = tmp_path / "srv/data"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("x")
    inst.install(prefix=tmp_path, with_venv=False)
    with pytest.raises(InstallError, match="not a virtual environment"):
        inst.uninstall(prefix=tmp_path, venv_dir="/srv/data")
    assert (precious / "keep.txt").exists()
    assert (tmp_path / "etc/systemd/system/edge-daemon.service").exists()  # nothing touched


def test_uninstall_of_nothing_is_fine(tmp_path: Path) -> None:
    res = inst.uninstall(prefix=tmp_path, purge=True)
    assert res.removed == [] and res.kept == []


def test_main_install_and_uninstall(tmp_path: Path) -> None:
    assert inst.main(["install", "--prefix", str(tmp_path), "--no-venv", "--device-id", "pump-07"]) == 0
    assert load_config(tmp_path / "etc/edge-daemon/config.toml").device.id == "pump-07"
    assert inst.main(["uninstall", "--prefix", str(tmp_path), "--purge"]) == 0
    assert not (tmp_path / "etc/edge-daemon").exists()
    # A bad source tree is an error exit, not a traceback.
    assert inst.main(["install", "--prefix", str(tmp_path), "--no-venv", "--source", str(tmp_path / "nowhere")]) == 1


def test_scripts_run_with_the_system_python(tmp_path: Path) -> None:
    # The installer is standard library only: a fresh device has no venv yet.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    subprocess.run([str(ROOT / "scripts/install"), "--prefix", str(tmp_path), "--no-venv", "--device-id", "pump-07"],
                   env=env, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "etc/systemd/system/edge-daemon.service").exists()
    subprocess.run([str(ROOT / "scripts/uninstall"), "--prefix", str(tmp_path)],
                   env=env, check=True, capture_output=True, timeout=60)
    assert not (tmp_path / "etc/systemd/system/edge-daemon.service").exists()
    assert (tmp_path / "etc/edge-daemon/config.toml").exists()


def test_torch_pin_comes_from_constraints() -> None:
    pin = inst.torch_pin(ROOT)
    assert pin.startswith("torch==") and pin in (ROOT / "constraints.txt").read_text().replace(" ", "")


@pytest.mark.slow
def test_install_creates_a_working_venv(tmp_path: Path) -> None:
    # The real thing: python -m venv, the CPU torch pin, then the package (minutes, ~1.5 GB).
    res = inst.install(prefix=tmp_path, with_venv=True, device_id="pump-07")
    assert res.venv == tmp_path / "opt/edge-daemon/venv"
    entry = res.venv / "bin/edge-daemon"
    assert os.access(entry, os.X_OK)
    out = subprocess.run(
        [str(res.venv / "bin/python"), "-c", "import torch, edge_daemon.install as m; print(torch.__version__, torch.version.cuda, m.__file__)"],
        capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path,
    ).stdout
    version, cuda, module_file = out.split()
    # The pinned CPU build, not a CUDA one.
    assert version.startswith(inst.torch_pin(ROOT).split("==")[1]) and cuda == "None"
    # A regular install: the service does not depend on the source tree.
    assert module_file.startswith(str(res.venv))
    inst.uninstall(prefix=tmp_path)
    assert not (tmp_path / "opt/edge-daemon").exists()


def test_a_wheel_installs_the_service_from_its_own_venv(tmp_path: Path) -> None:
    # A fleet ships a wheel, not a source tree: the unit and default config travel in it as
    # package data, and the service runs from the venv the wheel was installed into.
    import sys
    import zipfile

    dist = tmp_path / "dist"
    # Built as pip builds it for a user (isolated, with the build requirement's setuptools);
    # verbose, so the backend's warnings show.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = built.stdout + built.stderr
    assert "deprecat" not in output.lower() and "project.license" not in output, output[-3000:]
    (wheel,) = dist.glob("edge_daemon-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in ("edge-daemon.service", "config.toml"):
            assert zf.read(f"edge_daemon/data/{name}") == (ROOT / "systemd" / name).read_bytes()
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in zf.read(metadata).decode().splitlines()
    # The wheel's files, not this source tree's, first on the path of this venv's python
    # (which has the dependencies); run from elsewhere so the source tree is not on the path.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "edge_daemon", "install", "--prefix", str(root), "--no-systemctl", "--device-id", "pump-07"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"installed in {sys.prefix}" in proc.stderr
    unit = (root / "etc/systemd/system/edge-daemon.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/edge-daemon " in unit
    assert load_config(root / "etc/edge-daemon/config.toml").device.id == "pump-07"
    assert not (root / "opt").exists(), "no venv is created: the service uses the wheel's"
    # A --venv the wheel is not installed in is refused, not silently replaced.
    other = subprocess.run([*cmd, "--venv", "/opt/elsewhere"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and f"runs from {sys.prefix}" in other.stderr


def test_install_puts_the_mqtt_password_in_the_credential_store(tmp_path: Path) -> None:
    source = tmp_path / "password.txt"
    source.write_text("s3cret\n")
    root = tmp_path / "root"
    res = inst.install(prefix=root, with_venv=False, device_id="pump-07", mqtt_password_file=source)
    stored = root / "etc/credstore/edge-daemon.mqtt-password"
    assert res.mqtt_password == stored and stored.read_text() == "s3cret\n"
    assert _mode(stored) == 0o600 and _mode(stored.parent) == 0o700
    # The group is the service's when it exists here (install at / creates it), else left alone.
    config = root / "etc/edge-daemon/config.toml"
    assert res.config_group == (inst.SERVICE_USER if _group_exists(inst.SERVICE_USER) else None)
    if res.config_group is not None:
        import grp

        assert config.stat().st_gid == grp.getgrnam(inst.SERVICE_USER).gr_gid
    # Purged with the rest; kept otherwise.
    kept = inst.uninstall(prefix=root, systemctl=False)
    assert stored in kept.kept and stored.exists()
    inst.uninstall(prefix=root, purge=True, systemctl=False)
    assert not stored.exists()
    with pytest.raises(InstallError, match="empty"):
        (tmp_path / "empty").write_text("\n")
        inst.install(prefix=root, with_venv=False, mqtt_password_file=tmp_path / "empty")


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
