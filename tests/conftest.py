"""Fixtures for real resources: an MQTT broker, a state directory, a config."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config, parse_config
from edge_daemon.daemon import Daemon

if TYPE_CHECKING:
    import torch

# Small models train on 2 cores; more threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]


@contextlib.contextmanager
def running_broker(workdir: Path, conf: str = "") -> Iterator[LocalBroker]:
    """A broker on a free port working in `workdir` (created), with extra mosquitto.conf lines
    `conf` (a TLS listener, a password file); closed on the way out."""
    workdir.mkdir(parents=True)
    b = LocalBroker(workdir=workdir, conf=conf)
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A mosquitto (or amqtt) broker of this test's own on a free port."""
    with running_broker(tmp_path / "broker") as b:
        yield b


def make_config(tmp_path: Path, port: int = 1883, **sections: dict) -> Config:
    """A valid config rooted in tmp_path; `sections` override or add sections."""
    data: dict = {
        "device": {"id": "test-dev", "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")},
        # A client id of this test's own: an MQTT client left over from an earlier test that
        # reconnects to a broker now on a reused port must not take over this test's session.
        "mqtt": {"host": "127.0.0.1", "port": port, "topics": ["sensors/#"], "qos": 1, "client_id": f"edge-daemon-test-{uuid.uuid4().hex[:8]}"},
        "channels": {"names": list(CHANNELS), "period_s": 1.0},
        # Commits every 0.5 s at most rather than the default 30 s: tests wait for readings to
        # be stored, not for SD-card-sparing batches (benchmarks/ingest.py --wear measures those).
        "store": {"flush_interval_s": 0.5},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@pytest.fixture
def config(tmp_path: Path, broker: LocalBroker) -> Config:
    return make_config(tmp_path, port=broker.port)


def start_daemon(daemon: Daemon, timeout: float = 60.0) -> None:
    """Start an in-process daemon and wait until its subscriptions are granted.

    A fresh MQTT session receives nothing published before its SUBACK, so a test that
    publishes right after `start()` would lose its first messages to that race.
    """
    daemon.start()
    assert daemon.ingestor is not None
    if not daemon.ingestor.wait_subscribed(timeout):
        daemon.stop()
        raise AssertionError(f"daemon not subscribed within {timeout:.0f} s")


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Keep peft from loading bitsandbytes (~44 MB, ~1.4 s) while it imports and wraps a model.

    A `None` entry in sys.modules makes peft's imports of it fail as if the package were absent;
    the entry is removed on exit, so a later import works normally.
    """
    hide = "bitsandbytes" not in sys.modules
    if hide:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hide and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


def peft_lora_model(model: torch.nn.Module, target_modules: list[str], lora_cfg: Any) -> torch.nn.Module:
    """peft's LoRA on `model` (in place), configured as the trainer's own: the reference it is tested against."""
    with without_bitsandbytes():
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=list(target_modules), bias="none")
        return get_peft_model(model, config)


def save_random_peft_adapter(
    model: torch.nn.Module, directory: Path, target_modules: list[str], seed: int = 1, **lora_kwargs: Any
) -> None:
    """What the trainer does: wrap a copy of the base with peft, give it non-zero B, save_pretrained."""
    import torch

    with without_bitsandbytes():
        from peft import LoraConfig, get_peft_model
    options = {"r": 4, "lora_alpha": 8, "target_modules": target_modules, **lora_kwargs}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**options))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)  # B is zero at init; a zero adapter would prove nothing
    peft_model.save_pretrained(str(directory))
