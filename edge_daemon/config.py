"""Load and validate the TOML configuration.

One typed model per section; unknown keys are errors reported with their
path. Only `[device]`, `[mqtt]` and `[channels]` are required.

Over 400 lines on purpose: this is the whole configuration contract, one model per
section with its defaults, limits and the cross-field checks between sections, so that
every key is documented and validated in one place.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_daemon.errors import ConfigError


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a config must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DeviceConfig(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="device id, used in MQTT topics and the client id")
    state_dir: Path = Field(Path("/var/lib/edge-daemon"), description="holds store.db, base/ and adapters/")
    socket: Path = Field(Path("/run/edge-daemon/control.sock"), description="control socket path")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="logging level")


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    topics: list[str] = Field(default_factory=lambda: ["sensors/#"], min_length=1, description="subscriptions")
    qos: Literal[0, 1] = Field(1, description="subscription QoS; 1 = nothing lost")
    client_id: str | None = Field(None, description="persistent-session client id (default edge-daemon-<device.id>)")
    username: str | None = Field(None, description="broker user name")
    # repr=False: a config printed or logged never shows it.
    password: str | None = Field(None, repr=False, description="broker password (better: password_file, kept out of this file)")
    password_file: str | None = Field(
        None, description="file holding the broker password, read at start; may start with ${CREDENTIALS_DIRECTORY}"
    )
    tls: bool = Field(False, description="connect over TLS (the port is then usually 8883); never falls back to plaintext")
    ca_file: str | None = Field(None, description="TLS: CA certificate(s) (PEM) the broker's is checked against (default: the system's)")
    cert_file: str | None = Field(None, description="TLS: client certificate (PEM), with key_file")
    key_file: str | None = Field(None, description="TLS: the client certificate's private key (PEM); may start with ${CREDENTIALS_DIRECTORY}")
    key_password_file: str | None = Field(None, description="TLS: file holding key_file's passphrase, read at start")
    tls_insecure: bool = Field(False, description="TLS: accept a broker certificate whose name does not match host (still CA-checked)")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="how long the broker keeps the session (MQTT 5)")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay (exponential backoff)")
    max_payload_bytes: int = Field(16384, ge=64, description="larger payloads are rejected unparsed")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version ('3.1.1' for brokers without MQTT 5)")
    receive_maximum: int = Field(
        8000, ge=1, le=65535, description="MQTT 5: unacknowledged QoS 1 messages the broker may send us at once (a batch commits at half of it)"
    )
    broker_inflight: int = Field(
        20, ge=1, description="MQTT 3.1.1: the broker's in-flight limit per client (mosquitto max_inflight_messages)"
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @model_validator(mode="after")
    def _secrets_and_tls(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file are exclusive: keep the password in password_file only")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        tls_only = [key for key in ("ca_file", "cert_file", "key_file", "key_password_file") if getattr(self, key) is not None]
        if tls_only and not self.tls:
            raise ValueError(f"{', '.join(tls_only)} set but tls = false")
        if self.key_password_file is not None and self.key_file is None:
            raise ValueError("key_password_file is set without key_file")
        if self.tls_insecure and not self.tls:
            raise ValueError("tls_insecure is set but tls = false")
        return self


class ChannelsConfig(_Section):
    names: list[str] = Field(min_length=1, description="model inputs, in order; '<sensor>/<channel>'")
    period_s: float = Field(1.0, gt=0, description="grid period readings are aligned to")
    max_fill_steps: int = Field(5, ge=0, description="forward-fill at most this many grid steps; longer gaps split windows")
    lateness_s: float = Field(1.0, ge=0, description="a live grid step is scored once a reading this long past its end arrives")
    inputs_only: list[str] = Field(
        default_factory=list,
        description="channels (of `names`) the model reads but does not forecast: a set-point, a 0/1 working-day flag. "
        "They are stored and replayed like the others, but not forecast, scored or judged for drift",
    )
    units: dict[str, str] = Field(
        default_factory=dict, description="unit of measurement by channel (of `names`), e.g. {\"m1/temperature\" = \"°C\"}: shown in Home Assistant"
    )

    @field_validator("names")
    @classmethod
    def _names_unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("channel names must be unique")
        for name in names:
            # Two or more levels: the native grammar names `<sensor>/<channel>`, and an input mapping
            # may name more (a zigbee2mqtt friendly name with a "/" in it).
            if "/" not in name or any(not part for part in name.split("/")):
                raise ValueError(f"channel {name!r} must look like '<sensor>/<channel>'")
            if any(ch in name for ch in "#+"):
                raise ValueError(f"channel {name!r} must not contain MQTT wildcards")
        return names

    @model_validator(mode="after")
    def _inputs_only_known(self) -> ChannelsConfig:
        unknown = [name for name in self.inputs_only if name not in self.names]
        if unknown:
            raise ValueError(f"inputs_only names channels not in names: {unknown}")
        if len(set(self.inputs_only)) != len(self.inputs_only):
            raise ValueError("inputs_only names must be unique")
        if not self.forecast:
            raise ValueError("at least one channel must be forecast (not inputs_only)")
        unknown = [name for name in self.units if name not in self.names]
        if unknown:
            raise ValueError(f"units names channels not in names: {unknown}")
        return self

    @property
    def forecast(self) -> list[str]:
        """The channels forecast, scored and judged for drift, in config order."""
        return [name for name in self.names if name not in self.inputs_only]


INPUT_FORMATS = ("native", "zigbee2mqtt", "tasmota", "esphome", "shelly", "json")
# `$`, then `.key` or `[index]` steps: the JSON paths a `json` input mapping reads.
_JSON_PATH = re.compile(r"^\$((\.[^.\[\]]+)|(\[\d+\]))+$")
_SENSOR_FIELD = re.compile(r"\{(\d+)\}")


def valid_topic_filter(topic: str) -> str | None:
    """Why an MQTT subscription filter is invalid, or None: `#` only as the whole last level,
    `+` only as a whole level."""
    if not topic:
        return "empty topic filter"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"{topic!r}: '#' must be the whole last level"
        if "+" in level and level != "+":
            return f"{topic!r}: '+' must be a whole level"
    return None


class InputConfig(_Section):
    """One `[[inputs]]` mapping: the messages on `topic` are read in `format`."""

    topic: str = Field(description="MQTT topic filter (wildcards + and #); subscribed to")
    format: Literal["native", "zigbee2mqtt", "tasmota", "esphome", "shelly", "json"] = Field(
        description="payload form: native (sensors/<sensor>[/<channel>]), zigbee2mqtt, tasmota, esphome, shelly (Gen2+) or json"
    )
    timezone: str | None = Field(
        None, description="tasmota (and json with ts_unit 'iso'): IANA zone of times written without one (default: the device's)"
    )
    sensor: str | None = Field(
        None, description="json: the sensor part of each channel, from topic levels: '{1}' is the second level"
    )
    values: dict[str, str] = Field(
        default_factory=dict, description="json: channel field -> JSON path of its value ('$.temp', '$.env.t', '$.list[0]')"
    )
    ts: str | None = Field(None, description="json: JSON path of the reading's time (default: the arrival time)")
    ts_unit: Literal["s", "ms", "iso"] = Field("s", description="json: unit of `ts`: unix seconds, milliseconds, or ISO 8601 text")

    @field_validator("topic")
    @classmethod
    def _topic_filter(cls, topic: str) -> str:
        problem = valid_topic_filter(topic)
        if problem:
            raise ValueError(problem)
        return topic

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str | None) -> str | None:
        if zone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {zone!r} (an IANA name such as 'Europe/Berlin' or 'UTC')") from None
        return zone

    @model_validator(mode="after")
    def _keys_of_the_format(self) -> InputConfig:
        json_keys = [key for key in ("sensor", "values", "ts", "ts_unit") if key in self.model_fields_set]
        if self.format != "json":
            if json_keys:
                raise ValueError(f"{', '.join(json_keys)}: only for format 'json'")
            if self.timezone is not None and self.format != "tasmota":
                raise ValueError("timezone: only for formats 'tasmota' and 'json'")
            return self
        if not self.sensor:
            raise ValueError("format 'json' needs sensor (e.g. \"{1}\", the second topic level)")
        levels = len(self.topic.split("/"))
        for index in _SENSOR_FIELD.findall(self.sensor):
            if int(index) >= levels and not self.topic.endswith("#"):
                raise ValueError(f"sensor {self.sensor!r}: topic {self.topic!r} has no level {index}")
        if "/" in _SENSOR_FIELD.sub("", self.sensor) or any(ch in self.sensor for ch in "+#"):
            raise ValueError(f"sensor {self.sensor!r}: no '/', '+' or '#' outside the level fields")
        if not self.values:
            raise ValueError("format 'json' needs values, e.g. values = {temperature = \"$.temp\"}")
        for field, path in self.values.items():
            if not field or any(ch in field for ch in "/+#"):
                raise ValueError(f"values: field {field!r} must be non-empty, without '/', '+' or '#'")
            if not _JSON_PATH.match(path):
                raise ValueError(f"values.{field}: {path!r} is not a JSON path like '$.temp' or '$.a.b[0]'")
        if self.ts is not None and not _JSON_PATH.match(self.ts):
            raise ValueError(f"ts: {self.ts!r} is not a JSON path like '$.time'")
        if self.timezone is not None and self.ts_unit != "iso":
            raise ValueError("timezone: only with ts_unit = 'iso'")
        return self


class StoreConfig(_Section):
    budget_mb: float = Field(64.0, gt=0, description="store.db is kept under this size")
    disk_reserve_mb: float = Field(
        32.0, ge=0, description="space left free on the store's file system: the store's budget shrinks to fit; updates wait below it"
    )
    batch_size: int = Field(
        4000, ge=1, description="commit a write batch at this many readings (~24 bytes each: 4000 fill ~94 pages of 1 kB)"
    )
    flush_interval_s: float = Field(
        60.0,
        gt=0,
        description="... or once its oldest reading has waited this long: the bound on acknowledging a QoS 1 message"
        " (each commit writes its partly filled pages again: fewer, fuller commits, less SD wear; scoring does not wait)",
    )
    recent_hours: float = Field(24.0, gt=0, description="readings newer than this are always kept whole")
    reservoir_fraction: float = Field(0.3, gt=0, lt=1, description="share of the budget kept as a sample of older data")
    retention_interval_s: float = Field(60.0, gt=0, description="how often retention runs")
    check_interval_s: float = Field(
        86400.0,
        ge=0,
        description="how often the running store is checked for damage (PRAGMA quick_check: reads the whole file, writes"
        " nothing; a damaged store is moved aside for a new one); 0: only at start and after an error",
    )
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0, description="readings older than this are rejected")
    max_skew_s: float = Field(300.0, ge=0, description="readings this far ahead of the device clock are rejected")
    clock_trust: Literal["kernel", "always", "never"] = Field(
        "kernel",
        description="when the device clock is trusted to reject readings outside max_age_s/max_skew_s: 'kernel' while the"
        " kernel says it is NTP-synchronised (until then they are held), 'always' (never held), 'never' (always held)",
    )
    clock_hold_s: float = Field(
        6 * 3600.0, gt=0, description="a reading held outside the time window is rejected after waiting this long (by the device clock)"
    )
    clock_hold_max: int = Field(200_000, ge=0, description="readings held at most while the clock is not trusted (~25 bytes each, in the store budget; beyond it they are rejected)")
    segment_steps: int = Field(
        300, ge=2, description="retention keeps older data as a sample of whole segments of this many grid steps"
    )
    segment_s: float = Field(
        300.0, gt=0, description="segment length in seconds (default: segment_steps x channels.period_s; set it to override)"
    )
    synchronous: Literal["full", "normal"] = Field(
        "full", description="'full' fsyncs every commit (acked readings survive power loss); 'normal' only process crashes"
    )


class ModelConfig(_Section):
    window: int = Field(64, ge=4, description="steps of history the forecaster sees")
    d_model: int = Field(64, ge=4, description="embedding width")
    n_heads: int = Field(4, ge=1, description="attention heads")
    n_layers: int = Field(3, ge=1, description="transformer blocks")
    d_ff: int = Field(128, ge=4, description="feed-forward width")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in training")
    reversible: bool = Field(
        False,
        description="reversible (RevNet) blocks: training keeps no block's activations, whatever n_layers, and "
        "recomputes them in backward from the last block's outputs (as checkpointing does: ~1.4x the time of a "
        "forward+backward); gradient checkpointing then has nothing left to save and is ignored. A base is trained "
        "for it: changing it needs a new base",
    )
    bootstrap_min_windows: int = Field(512, ge=16, description="windows needed before a device trains its own base model")
    pretrain_steps: int = Field(600, ge=1, description="optimizer steps of base-model training (~30 s on one idle core at the defaults)")
    pretrain_batch_size: int = Field(32, ge=1, description="windows per base-model training step")
    pretrain_lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate of base-model training")
    pretrain_val_fraction: float = Field(0.1, gt=0, lt=1, description="newest share of windows held out to validate the base model")
    season_steps: int = Field(
        0, ge=0, description="grid steps per season for the seasonal-naive baseline (0: detect it in the training data)"
    )
    season_max_steps: int = Field(1440, ge=4, description="longest season looked for when detecting one")
    ridge_lags: int = Field(
        16, ge=1, description="steps of every channel the ridge baseline and the model's linear path regress on (at most `window`)"
    )
    horizons: list[int] = Field(
        default_factory=list,
        description="steps ahead forecast and published (1 first; each at most window / 2); empty: the next step "
        "and one hour's worth (capped at window / 2). A base is trained for them: changing them needs a new base",
    )
    calendar: list[Literal["day", "week"]] = Field(
        default_factory=lambda: ["day", "week"],
        description="calendar inputs of the model (time of day, day of week); each is used only when the training "
        "data spans at least two of its cycles",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")
        if self.horizons and (self.horizons[0] != 1 or self.horizons != sorted(set(self.horizons))):
            raise ValueError("horizons must start at 1 and increase")
        if self.horizons and self.horizons[-1] > max(1, self.window // 2):
            raise ValueError(f"horizons must be at most window / 2 = {self.window // 2} steps")
        return self


class LoraConfigSection(_Section):
    r: int = Field(4, ge=1, description="adapter rank")
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: ["qkv", "proj", "fc1", "fc2"], min_length=1, description="Linear layers inside a block that get adapters"
    )
    max_blocks: int = Field(2, ge=1, description="adapt at most this many blocks, chosen by gradient norm on a probe batch")
    probe_windows: int = Field(
        16, ge=1, description="windows in the probe batch that ranks blocks (capped by the plan's micro-batch)"
    )
    extra_modules: list[str] = Field(
        default_factory=lambda: ["head", "linear", "far_head", "far_linear"],
        description="Linear layers (or lists of them) outside the blocks that always get adapters (the head follows "
        "level and scale shifts; `linear`, the autoregressive path, follows changed dynamics; the far_ ones are "
        "the further horizons' own)",
    )
    save: Literal["fp32", "int8", "both"] = Field(
        "fp32",
        description="how an adapter's weights are saved: 'fp32' peft's adapter_model.safetensors; 'int8' only "
        "adapter_model.int8.safetensors (about 4x smaller, int8 with a scale per rank component); 'both' the two, the "
        "fp32 file holding the int8 values dequantised. With 'int8' or 'both' the adapter trains with fake "
        "quantisation, so what is gated is what is saved. peft's loader (PeftModel.from_pretrained) reads only the fp32 file",
    )


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1, description="effective batch (micro-batches accumulate to it)")
    micro_batch: int = Field(32, ge=1, description="largest micro-batch the planner may start with")
    steps: int = Field(60, ge=1, description="optimizer steps per update")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    replay_fraction: float = Field(0.5, ge=0, lt=1, description="share of each batch drawn from older data in the store")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="newest share of recent windows held out for the gate")
    gate_tolerance: float = Field(
        0.30, ge=0, description="replayed-data loss (mean absolute error) may worsen by at most this fraction"
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="'auto' lets the watchdog decide")
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field(
        "auto", description="'auto' switches to 8-bit state under pressure where it saves more than importing bitsandbytes costs"
    )
    start_on: list[Literal["drift", "new_data", "request"]] = Field(
        ["drift", "new_data", "request"],
        description="reasons that may start an update: residual drift, min_new_windows of new data, an operator's request",
    )
    min_interval_s: float = Field(3600.0, ge=0, description="minimum spacing between updates")
    min_new_windows: int = Field(
        21600, ge=1, description="new windows since the last update that justify one without drift (6 h at 1 s)"
    )
    recent_hours: float = Field(1.0, gt=0, description="what counts as recent data for an update")
    idle_cpu_percent: float = Field(50.0, gt=0, le=100, description="device counts as idle below this CPU use (100: always)")
    idle_window_s: float = Field(30.0, gt=0, description="... averaged over this long")
    check_interval_s: float = Field(10.0, gt=0, description="how often the update trigger is evaluated")
    keep_versions: int = Field(5, ge=1, description="adapter versions kept on disk")
    stop_timeout_s: float = Field(20.0, gt=0, description="on shutdown, wait this long for an update to stop at a micro-batch boundary")
    nice: int = Field(10, ge=0, le=19, description="niceness of the training process")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the accumulated gradient to this norm (0 = no clipping)")
    min_8bit_size: int = Field(
        0, ge=0, description="bitsandbytes keeps tensors smaller than this in fp32 (its default 4096 would cover every LoRA tensor)"
    )
    gate_min_improvement: float = Field(
        0.0, ge=0, lt=1, description="recent validation loss must fall by at least this fraction to accept an adapter"
    )
    rss_sample_interval_s: float = Field(0.01, gt=0, description="how often an update samples its RSS to find its peak")
    gate_recent_statistic: Literal["median", "mean"] = Field(
        "median",
        description="whether the recent loss improves, judged by the median of the per-window differences against the incumbent "
        "(a few impacts in the held-out minutes do not decide) or by the mean losses",
    )
    gate_recurrence: bool = Field(
        True, description="weigh the replayed loss's worsening by how likely the old regime is to return (false: the fixed gate_tolerance)"
    )
    gate_min_weight: float = Field(0.1, ge=0, le=1, description="the old regime's least weight: a permanent change may forget it by up to gate_tolerance / this")
    gate_settle_hours: float = Field(
        1.0, ge=0, description="a change never seen reversed counts as permanent once it has lasted this long (its weight falls to gate_min_weight)"
    )
    gate_retry: Literal["replay", "anchor", "off"] = Field(
        "replay", description="before rejecting for forgetting, train once more: with heavier replay, anchored to the base (L2-SP), or not"
    )
    gate_retry_replay_fraction: float = Field(0.8, ge=0, lt=1, description="replay share of each batch in the 'replay' retry")
    gate_retry_anchor: float = Field(1.0, ge=0, description="strength of the 'anchor' retry's pull toward the adapter's start (the base)")
    step_in_backward: Literal["auto", "on", "off"] = Field(
        "auto",
        description="step each weight and free its gradient as soon as backward makes it; 'auto' where a full set of gradients is >= 1 MB (never for the default LoRA); plans with accumulation only run without it",
    )
    forward_only: Literal["auto", "on", "off"] = Field(
        "auto",
        description="forward-only (zeroth-order) updates, whose memory is a scoring pass's: 'auto' as the last rung, at critical memory or where no backward fits; 'on' always",
    )
    forward_only_lr: float = Field(
        15.0, gt=0, description="forward-only: step along each random direction per unit of measured slope, times the adapter's weight count"
    )
    forward_only_eps: float = Field(1e-3, gt=0, description="forward-only: size of the perturbation whose two losses give the slope")
    forward_only_step_factor: int = Field(
        16, ge=1, description="forward-only: steps for each optimizer step it replaces (each follows one random direction, so it needs more)"
    )


class MemoryConfig(_Section):
    budget_mb: float | None = Field(None, gt=0, description="memory the service may use (default: cgroup limit or machine)")
    elevated: float = Field(0.70, gt=0, lt=1, description="share of the budget at which checkpointing turns on")
    high: float = Field(0.80, gt=0, lt=1, description="share at which micro-batches halve and optimizer state goes 8-bit")
    critical: float = Field(0.95, gt=0, lt=1, description="share at which a running update stops")
    hysteresis: float = Field(0.05, ge=0, lt=0.5, description="a level is left only this far below its threshold")
    sample_interval_s: float = Field(0.2, gt=0, description="watchdog sampling period")
    min_available_mb: float = Field(64.0, ge=0, description="system MemAvailable below this counts as critical")
    retry_after_s: float = Field(300.0, ge=0, description="back-off after an update stopped at critical; doubles per repeat")
    retry_max_s: float = Field(3600.0, ge=0, description="longest back-off after repeated critical stops")
    update_share: float = Field(
        0.15, gt=0,
        description="what an update may add, as a share of the service's usage before it: the start plan is the loosest "
        "whose dry run stays within it (else the tightest), and an update starts only where that much fits under critical",
    )  # fmt: skip

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> MemoryConfig:
        if not self.elevated < self.high < self.critical:
            raise ValueError("thresholds must satisfy elevated < high < critical")
        return self


class DriftConfig(_Section):
    detector: Literal["adwin", "page_hinkley", "kswin"] = Field("adwin", description="detector on inputs and residuals")
    delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence")
    min_samples: int = Field(60, ge=1, description="steps before a detector may fire")
    evaluate_interval_s: float | None = Field(
        None, gt=0, description="no effect (drift is judged at every grid step); accepted so older configs load, with a warning"
    )
    clock: int = Field(32, ge=1, description="ADWIN checks for a cut every this many steps")
    ph_delta: float = Field(0.1, ge=0, description="Page-Hinkley: change of the mean tolerated per step (standardised units)")
    ph_threshold: float = Field(50.0, gt=0, description="Page-Hinkley: cumulative deviation that signals drift")
    kswin_alpha: float = Field(1e-5, gt=0, lt=1, description="KSWIN: significance of the Kolmogorov-Smirnov test")
    kswin_window_size: int = Field(200, ge=2, description="KSWIN: sliding window length")
    kswin_stat_size: int = Field(60, ge=1, description="KSWIN: newest values compared with a sample of the older ones")
    residual_halflife_steps: float = Field(30.0, gt=0, description="half-life of the EWMA of |residual| reported as the level")
    inputs: Literal["reference", "stream"] = Field(
        "reference",
        description="input drift: 'reference' compares a rolling window with the training data (PSI); "
        "'stream' runs `detector` on every value (fast, but fires at every change of operating state)",
    )
    input_window_s: float = Field(86400.0, gt=0, description="'reference': span of the rolling window; hold whole cycles (a day)")
    psi_threshold: float = Field(1.0, gt=0, description="'reference': PSI over this is input drift")
    psi_rearm: float = Field(0.5, gt=0, description="'reference': PSI under this ends the episode (one alert each)")
    residuals: Literal["window", "stream"] = Field(
        "window",
        description="residual drift: 'window' compares the mean |residual| of a rolling window with the first "
        "window after start or an accepted adapter (while it fills, with `residual_prior`); 'stream' runs `detector` on every residual",
    )
    residual_window_s: float = Field(86400.0, gt=0, description="'window': span of the rolling window; hold whole cycles")
    residual_ratio: float = Field(2.0, gt=1, description="'window': mean |residual| this many times the baseline is drift")
    residual_rearm_ratio: float = Field(1.5, ge=1, description="'window': under this ratio a new episode may alert again")
    # CUSUM settings from benchmarks/drift.py at 1 reading/s on the sample motor (default-size base
    # trained on a night). Judged against its own last hour, the daily rise of |residual| (twice the
    # night's by day) read as a shift 45 times in 30 stationary days (per step, k=0.5, h=100).
    # Against the same time of day on earlier days, on 30-second means, k=1.0 and h=30 raised none
    # (the highest sum: 19, the bursts of the 15-minute batch cycle, which no clock explains) and
    # found the 45% current jump in minutes where it raises the residuals twofold or more.
    cusum: bool = Field(
        True, description="'window': also run a CUSUM on the |residuals|, so an abrupt shift alerts in minutes",
    )
    cusum_k: float = Field(1.0, ge=0, lt=3, description="CUSUM slack: shifts under this many standard deviations never add up")
    cusum_h: float = Field(30.0, gt=0, description="CUSUM threshold: accumulated standard deviations that signal drift")
    cusum_warmup_steps: int = Field(
        3600, ge=2, description="CUSUM: steps learning the mean and std of what it reads (also the memory of their running estimate)"
    )
    cusum_block_s: float = Field(
        30.0, gt=0, description="CUSUM: it reads the mean of each this many seconds of |residual| (at least one step)"
    )
    cusum_by_time_of_day: bool = Field(
        True, description="CUSUM: judge each |residual| against the typical one at the same time of day on earlier days "
        "(it watches once it has seen a whole day, or `residual_prior` covers the hour), so the daily swing of the model's error is not a shift",
    )
    # Level judges (drift/level.py), from benchmarks/drift.py --level-seeds 5 at 1 reading/s on the
    # sample motor: on current and vibration, k=2 and h=20 raised no false alarm in 150 stationary
    # days and found the 45% current jump in 1.5-2 minutes, from the first day after start-up on.
    # The motor's temperature follows the weather (days of warm or cold that no clock explains): a
    # judge there saw a shift nearly twice a day, so channels are named, not all judged.
    level_channels: list[str] = Field(
        default_factory=list, description="forecast channels whose level is judged against the same time of day on earlier days "
        "(half-minute medians, a two-sided CUSUM): an abrupt lasting shift (an overload) is drift in minutes, and a reason to "
        "adapt. For channels the process sets (current, load, vibration, flow), not weather-driven ones",
    )
    level_k: float = Field(2.0, ge=0, lt=10, description="level CUSUM slack: shifts under this many standard deviations never add up")
    level_h: float = Field(20.0, gt=0, description="level CUSUM threshold: accumulated standard deviations that signal a shift")
    level_block_s: float = Field(30.0, gt=0, description="level judges read the median of each this many seconds (at least one step)")
    residual_prior: bool = Field(
        True, description="'window': after start-up and an accepted adapter, start the residual judges from the served model's "
        "held-out validation residuals (in its meta) and refine them with the first day; false, or a model without them: learn a day first",
    )

    @model_validator(mode="after")
    def _kswin_sizes(self) -> DriftConfig:
        if self.kswin_window_size < 2 * self.kswin_stat_size:
            raise ValueError("kswin_window_size must be >= 2 * kswin_stat_size")
        if self.psi_rearm >= self.psi_threshold:
            raise ValueError("psi_rearm must be below psi_threshold")
        if self.residual_rearm_ratio >= self.residual_ratio:
            raise ValueError("residual_rearm_ratio must be below residual_ratio")
        return self

    @field_validator("evaluate_interval_s")
    @classmethod
    def _evaluate_interval_has_no_effect(cls, value: float | None) -> float | None:
        if value is not None:
            logging.getLogger(__name__).warning(
                "[drift] evaluate_interval_s has no effect (drift is judged at every grid step); remove it from the config"
            )
        return value


class OutputsConfig(_Section):
    forecast_every: int = Field(1, ge=0, description="publish every Nth forecast (0 = never)")
    anomaly_threshold: float = Field(6.0, gt=0, description="alert when the anomaly score exceeds this")
    status_interval_s: float = Field(30.0, gt=0, description="retained status refresh period")
    qos: Literal[0, 1] = Field(0, description="QoS of forecast and status messages (alerts always use 1)")
    serve: Literal["best", "model"] = Field(
        "best", description="'best': serve the model or a baseline (persistence, seasonal naive, ridge), whichever forecasts best"
    )
    compare_steps: int = Field(600, ge=10, description="... judged by mean |error| over this many recent scored steps")
    switch_margin: float = Field(0.05, ge=0, lt=1, description="... and switched only when another is this much better")


class HomeAssistantConfig(_Section):
    discovery: bool = Field(
        False, description="publish Home Assistant MQTT discovery (one retained device config); turned off: the config published before is removed"
    )
    prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix (its MQTT integration's setting)")

    @field_validator("prefix")
    @classmethod
    def _topic_prefix(cls, prefix: str) -> str:
        if not prefix or any(ch in prefix for ch in "+#\0"):
            raise ValueError(f"prefix {prefix!r} must be a non-empty topic without the wildcards + and #")
        if any(not level for level in prefix.split("/")):
            raise ValueError(f"prefix {prefix!r} must not start or end with '/' or hold an empty level")
        return prefix


class MetricsConfig(_Section):
    """`[metrics]`: Prometheus metrics over HTTP, or as a file for node_exporter; off while neither is set."""

    listen: str | None = Field(
        None, description="serve /metrics on this host:port (\"127.0.0.1:9108\"; IPv6 in brackets: \"[::1]:9108\"); unset: no HTTP server"
    )
    textfile: Path | None = Field(
        None, description="write the metrics to this file for node_exporter's textfile collector (name it *.prom); replaced atomically"
    )
    textfile_interval_s: float = Field(15.0, gt=0, description="how often the textfile is rewritten")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        if listen is not None:
            listen_address(listen)  # raises ValueError with what is wrong
        return listen

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to serve on, the host without IPv6 brackets; None without `listen`."""
        return None if self.listen is None else listen_address(self.listen)

    def warnings(self) -> list[str]:
        """What validate-config points out: an endpoint reachable from other machines."""
        address = self.address
        if address is not None and not _loopback(address[0]):
            return [f"metrics.listen: {self.listen} is reachable from other machines (the metrics have no authentication)"]
        return []


def listen_address(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[addr]:port`) as (host, port); ValueError saying what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{listen!r}: want host:port, e.g. \"127.0.0.1:9108\" or \"[::1]:9108\"")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"{listen!r}: unbalanced brackets around the IPv6 address")
    if host.startswith("["):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{listen!r}: brackets are only for IPv6 addresses")
    elif ":" in host:
        raise ValueError(f"{listen!r}: write an IPv6 address in brackets, e.g. \"[::1]:9108\"")
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"{listen!r}: empty or invalid host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{listen!r}: port must be a number 0-65535")
    return host, int(port_text)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable

class Config(_Section):
    device: DeviceConfig
    mqtt: MqttConfig
    channels: ChannelsConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    inputs: list[InputConfig] = Field(
        default_factory=list, description="[[inputs]] mappings of other payload forms; none: the native grammar on [mqtt] topics"
    )

    @model_validator(mode="after")
    def _channels_receivable(self) -> Config:
        for topic in self.mqtt.topics:
            problem = valid_topic_filter(topic)
            if problem:
                raise ValueError(f"mqtt.topics: {problem}")
        # The native grammar names channels `<sensor>/<channel>`: one with more levels could only
        # come through a mapping of another format.
        deep = [name for name in self.channels.names if name.count("/") != 1]
        if deep and all(mapping.format == "native" for mapping in self.inputs):
            raise ValueError(f"channels.names: {deep} have more than two levels, which only [[inputs]] of other formats give")
        return self

    @model_validator(mode="after")
    def _level_channels_forecast(self) -> Config:
        unknown = [name for name in self.drift.level_channels if name not in self.channels.forecast]
        if unknown:
            raise ValueError(f"drift.level_channels: {unknown} are not forecast channels ({self.channels.forecast})")
        return self

    @model_validator(mode="after")
    def _defaults_from_device(self) -> Config:
        if self.mqtt.client_id is None:
            self.mqtt.client_id = f"edge-daemon-{self.device.id}"
        # Replay segments are sized in grid steps, so every period gets whole windows to replay
        # (300 s at a 30-minute period would hold one reading a segment).
        if "segment_s" not in self.store.model_fields_set:
            self.store.segment_s = self.store.segment_steps * self.channels.period_s
            self.store.model_fields_set.discard("segment_s")
        return self

    @property
    def store_path(self) -> Path:
        return self.device.state_dir / "store.db"

    @property
    def base_dir(self) -> Path:
        return self.device.state_dir / "base"

    @property
    def adapters_dir(self) -> Path:
        return self.device.state_dir / "adapters"

    @property
    def subscriptions(self) -> list[str]:
        """The topic filters subscribed to: the [[inputs]] topics (and `[mqtt] topics` when set
        beside them), else `[mqtt] topics`."""
        if not self.inputs:
            return list(self.mqtt.topics)
        topics = [mapping.topic for mapping in self.inputs]
        if "topics" in self.mqtt.model_fields_set:
            topics += self.mqtt.topics
        return list(dict.fromkeys(topics))

    @property
    def topic_prefix(self) -> str:
        return f"edge/{self.device.id}/"


def _path_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif err["type"] == "missing":
                message = "required"
            problems.append((_path_of(err["loc"]), message))
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        raise ConfigError(f"{source}: invalid configuration\n{lines}", problems) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError with field paths."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", [("<file>", str(exc.strerror))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", [("<file>", str(exc))]) from None
    return parse_config(data, source=str(path))
