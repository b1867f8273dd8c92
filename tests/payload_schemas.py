"""The MQTT payloads a test sees, checked against the JSON Schema the package ships for their topic
(`edge_daemon/data/schemas/<topic>.schema.json`, generated from edge_daemon/mqtt/outputs.py)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from edge_daemon.mqtt.outputs import TOPICS


def shipped_schema(topic: str) -> dict[str, Any]:
    """The schema file of `topic` as the installed package carries it."""
    return json.loads(files("edge_daemon").joinpath("data", "schemas", f"{topic}.schema.json").read_text(encoding="utf-8"))


VALIDATORS = {topic: Draft202012Validator(shipped_schema(topic)) for topic in TOPICS}


def violations(topic: str, payload: Any) -> list[str]:
    """Why `payload`, received on `topic` (`edge/<id>/<suffix>`), does not match its topic's schema;
    [] when it does. A topic without a schema is a violation too."""
    suffix = topic.rsplit("/", 1)[-1]
    validator = VALIDATORS.get(suffix)
    if validator is None:
        return [f"{topic}: no payload schema for '{suffix}'"]
    found = []
    for error in validator.iter_errors(payload):
        for cause in _causes(validator.schema, payload, error):
            found.append(f"{topic}: {cause.json_path}: {cause.message} in {json.dumps(payload)[:300]}")
    return found


def _causes(schema: dict[str, Any], payload: Any, error: ValidationError) -> list[ValidationError]:
    """A topic's schema is a oneOf over its records, told apart by a discriminator key (`type`,
    `online`): the complaints of the record the payload names, not of every record."""
    discriminator = schema.get("discriminator")
    if error.validator != "oneOf" or discriminator is None or not isinstance(payload, dict):
        return [error]
    value = payload.get(discriminator["propertyName"])
    key = json.dumps(value) if isinstance(value, bool) else value  # the mapping's keys are strings
    refs = [branch.get("$ref") for branch in schema["oneOf"]]
    ref = discriminator["mapping"].get(key) if isinstance(key, str) else None
    if ref not in refs:
        return [error]
    branch = refs.index(ref)
    return [cause for cause in error.context or [] if cause.relative_schema_path[0] == branch] or [error]
