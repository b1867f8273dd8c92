"""Exception types of edge-daemon.

Raised inside the library and translated only at the edges: the CLI turns
them into exit codes and messages, the control socket into `{"ok": false}`.
"""

from __future__ import annotations


class EdgeDaemonError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EdgeDaemonError):
    """The configuration file is missing, unreadable or invalid.

    `problems` holds one `(field_path, message)` pair per invalid field.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = problems or []


class StoreError(EdgeDaemonError):
    """The replay store cannot be opened, migrated or written."""


class StoreReplacedError(StoreError):
    """The store was found damaged while running and replaced by a new one: what failed may be
    tried again at once (it goes to the new store)."""


class DiskFullError(StoreError):
    """The file system holding the store has no room for the write; nothing of it was stored."""


class PayloadError(EdgeDaemonError):
    """An MQTT payload was rejected; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ModelError(EdgeDaemonError):
    """The base model is missing, incompatible with the config, or corrupt."""


class BaseFormatError(ModelError):
    """The base model was saved by an earlier forecaster layout; it must be trained again."""


class BaseDamagedError(ModelError):
    """The base model's files no longer match the sha256 recorded when it was saved."""


class AdapterError(EdgeDaemonError):
    """An adapter version is missing, corrupt or cannot be served."""


class TrainingError(EdgeDaemonError):
    """An update failed (non-finite loss, no data); nothing served changed."""


class TrainingAborted(EdgeDaemonError):
    """An update stopped cleanly at a micro-batch boundary (memory or shutdown)."""


class ControlError(EdgeDaemonError):
    """A control-socket request failed, or the daemon could not be reached."""


class DaemonUnreachable(ControlError):
    """Nothing answered on the control socket; `cause` is missing, refused, not_socket, permission, timeout or other."""

    def __init__(self, message: str, cause: str = "other") -> None:
        super().__init__(message)
        self.cause = cause


class PermissionDenied(ControlError):
    """The peer may not run this command (mutating commands need root or the daemon's user/group)."""


class InstallError(EdgeDaemonError):
    """Installing or uninstalling the service failed (permissions, venv, systemctl)."""


class ReportError(EdgeDaemonError):
    """A report cannot be made from this state directory (no replay store, or it holds no readings)."""


class DiscoveryError(EdgeDaemonError):
    """A Home Assistant discovery config could not be removed: the broker is unreachable or did not acknowledge."""
