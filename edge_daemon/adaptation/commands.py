"""The replies of the update path: the `adapter`, `adapters`, `train` and `rollback` control
commands and the `adapter` section of `status`, read from an `Adaptation` (whose own
`status()` is the `training` section).
"""

from __future__ import annotations

from edge_daemon.adaptation.owner import Adaptation
from edge_daemon.control.protocol import Request
from edge_daemon.control.replies import AdapterDetail, AdapterListing, AdapterReply, AdaptersReply, AdapterSummary, RollbackReply, TrainReply


def adapter_summary(adaptation: Adaptation) -> AdapterSummary:
    """The `adapter` section of `status`, and of the `adapter` and `rollback` replies."""
    version = adaptation.current_adapter()
    if version is None:
        return {"version": None, "created": None, "size_bytes": 0, "val_loss": None, "base": adaptation.base is not None}
    return {
        "version": version.version, "created": version.created, "size_bytes": version.size_bytes,
        "val_loss": version.meta.val_loss, "base": True,
    }  # fmt: skip


def handle_adapter(adaptation: Adaptation, request: Request) -> AdapterReply:
    version = adaptation.current_adapter()
    detail: AdapterDetail = {**adapter_summary(adaptation)}
    if version is not None:
        meta = version.meta
        detail.update(
            {
                "metrics_before": meta.metrics_before,
                "metrics_after": meta.metrics_after,
                "plan": meta.plan,
                "chosen_blocks": meta.chosen_blocks,
                "peak_rss_mb": meta.peak_rss_mb,
                "reason": meta.reason,
            }
        )
    return {"adapter": detail}


def handle_adapters(adaptation: Adaptation, request: Request) -> AdaptersReply:
    current = adaptation.current_adapter()
    listed: list[AdapterListing] = []
    for version in adaptation.adapters.list():
        before, after = version.meta.metrics_before, version.meta.metrics_after
        listed.append(
            {
                "version": version.version,
                "created": version.created,
                "size_bytes": version.size_bytes,
                "val_loss": version.meta.val_loss,
                "current": current is not None and version.version == current.version,
                "metrics": {
                    "recent_before": before.get("recent_val_loss"),
                    "recent_after": after.get("recent_val_loss"),
                    "replay_before": before.get("replay_val_loss"),
                    "replay_after": after.get("replay_val_loss"),
                },
            }
        )
    return {"current": current.version if current else None, "adapters": listed}


def handle_train(adaptation: Adaptation, request: Request) -> TrainReply:
    if adaptation.runner.running:
        return {"accepted": True, "state": "running", "message": "an update is already running"}
    if not adaptation.trigger.request():
        message = 'requests may not start an update here: [train] start_on leaves out "request"'
        return {"accepted": False, "state": "idle", "message": message}
    message = "update requested: it starts when the device is idle and memory is normal"
    if adaptation.base is None:
        message = "no base model yet: a base model is trained first, once enough data is stored"
    return {"accepted": True, "state": "idle", "message": message}


def handle_rollback(adaptation: Adaptation, request: Request) -> RollbackReply:
    version_number = int(request["version"])  # checked by the control server: an int >= 1
    adaptation.rollback(version_number)
    return {"adapter": adapter_summary(adaptation)}


__all__ = ["adapter_summary", "handle_adapter", "handle_adapters", "handle_rollback", "handle_train"]
