from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_daemon.config import load_config
from edge_daemon.errors import ConfigError

MINIMAL = """
[device]
id = "pump-07"

[mqtt]
host = "127.0.0.1"

[channels]
names = ["m1/temperature", "m1/vibration"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.mqtt.client_id == "edge-daemon-pump-07"
    assert cfg.mqtt.qos == 1
    assert cfg.store.max_age_s == 7 * 24 * 3600
    assert cfg.store_path == Path("/var/lib/edge-daemon/store.db")
    assert cfg.topic_prefix == "edge/pump-07/"


def test_unknown_key_reported_with_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "\n[store]\nbudget_mbb = 3\n"))
    assert ("store.budget_mbb", "unknown key") in err.value.problems


def test_unknown_section_and_missing_section(tmp_path: Path) -> None:
    text = MINIMAL.replace("[channels]", "[chanels]")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    paths = {path for path, _ in err.value.problems}
    assert {"chanels", "channels"} <= paths


def test_cross_field_rules(tmp_path: Path) -> None:
    text = MINIMAL + "\n[memory]\nelevated = 0.9\nhigh = 0.8\n\n[model]\nd_model = 30\nn_heads = 4\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    paths = {path for path, _ in err.value.problems}
    assert {"memory", "model"} <= paths


def test_bad_channel_name_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL.replace('"m1/vibration"', '"vibration"')))
    assert err.value.problems[0][0] == "channels.names"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_horizons_start_at_one_and_fit_in_half_a_window() -> None:
    from edge_daemon.config import ModelConfig
    from edge_daemon.training.pretrain import horizon_steps

    assert horizon_steps(ModelConfig(), 1.0) == (1, 32)  # an hour is 3600 steps: capped at half the window
    assert horizon_steps(ModelConfig(), 600.0) == (1, 6)
    assert horizon_steps(ModelConfig(), 3600.0) == (1,)
    assert horizon_steps(ModelConfig(horizons=[1, 4, 12]), 1.0) == (1, 4, 12)
    for bad in ([2, 4], [1, 4, 4], [1, 40]):
        with pytest.raises(ValidationError, match="horizons"):
            ModelConfig(horizons=bad)


def test_a_key_that_never_did_anything_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`[drift] evaluate_interval_s` never did anything: older configs with it still load, and say so."""
    with caplog.at_level(logging.WARNING, logger="edge_daemon.config"):
        cfg = load_config(write(tmp_path, MINIMAL + "\n[drift]\nevaluate_interval_s = 5.0\n"))
    assert cfg.drift.evaluate_interval_s == 5.0
    assert "evaluate_interval_s has no effect" in caplog.text
