"""schemas/asyncapi.yaml: generated from the code, valid AsyncAPI 3.0, every reference resolves
(issue #18 part 4).

The validator is the official AsyncAPI 3.0.0 JSON Schema (`@asyncapi/specs` 6.11.1,
`schemas/3.0.0-without-$id.json`, Apache-2.0, kept in tests/data/asyncapi) run by
check-jsonschema, as a billing team's CI would.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from schemas.agent_events import AGENT_EVENT_ADAPTER
from schemas.license_events import LicenseEvent
from worker.asyncapi import asyncapi_yaml, build_asyncapi_document
from worker.ingest.decoding import RejectReason
from worker.settings import Settings
from worker.trust.license_events import license_event_headers
from worker.trust.signing import SigningKeys

ROOT = Path(__file__).parents[2]
COMMITTED = ROOT / "schemas" / "asyncapi.yaml"
ASYNCAPI_SCHEMA = ROOT / "tests" / "data" / "asyncapi" / "asyncapi-3.0.0.schema.json"
CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))


def validate_with_check_jsonschema(document: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--schemafile", str(ASYNCAPI_SCHEMA), str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_committed_document_is_the_generated_one() -> None:
    committed = COMMITTED.read_text(encoding="utf-8")
    assert committed == asyncapi_yaml(build_asyncapi_document()), "run `make schemas`"


def test_the_committed_document_is_valid_asyncapi_3() -> None:
    result = validate_with_check_jsonschema(COMMITTED)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("operations", "sendLicenseEvents", "action"), "publish"),  # AsyncAPI 2 wording
        (("components", "schemas", "Heartbeat", "discriminator"), {"propertyName": "type"}),
        (("channels", "licenseEvents", "address"), 42),
    ],
)
def test_the_validator_refuses_a_broken_document(
    tmp_path: Path, path: tuple[str, ...], value: Any
) -> None:
    document = build_asyncapi_document()
    node = document
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert validate_with_check_jsonschema(broken).returncode == 1


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def resolve(document: dict[str, Any], reference: str) -> Any:
    assert reference.startswith("#/"), reference
    node: Any = document
    for step in reference[2:].split("/"):
        node = node[step.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves_inside_the_document() -> None:
    document = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    found = set(references(document))
    assert "#/components/schemas/UserProfile" in found
    for reference in found:
        resolve(document, reference)


def test_all_five_topics_with_their_messages() -> None:
    document = build_asyncapi_document()
    settings = Settings.model_construct()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {
        settings.heartbeat_topic,
        settings.lifecycle_topic,
        settings.admin_topic,
        settings.license_events_topic,
        settings.dlq_topic,
    }
    actions = {op["channel"]["$ref"]: op["action"] for op in document["operations"].values()}
    assert actions["#/channels/licenseEvents"] == "send"
    assert actions["#/channels/agentHeartbeats"] == "receive"
    for channel in document["channels"].values():
        for message in channel["messages"].values():
            resolved = resolve(document, message["$ref"])
            assert "kafka" in resolved["bindings"]


def test_dead_letter_headers_name_every_reason() -> None:
    headers = build_asyncapi_document()["components"]["messages"]["deadLetter"]["headers"]
    reasons = headers["properties"]["dlq.error.class"]["enum"]
    assert reasons == [reason.value for reason in RejectReason]


def payload_validator(document: dict[str, Any], model_name: str) -> Draft202012Validator:
    """A payload schema checked in the context of the whole document, so its refs resolve."""
    schema = {"$ref": f"#/components/schemas/{model_name}", **document}
    return Draft202012Validator(schema)


def test_payload_schemas_agree_with_the_models() -> None:
    document = build_asyncapi_document()
    heartbeat = {
        "schema_version": 1,
        "type": "heartbeat",
        "event_id": "e-1",
        "customer_id": "c-1",
        "device_id": "d-1",
        "occurred_at": "2026-11-30T10:00:00Z",
    }
    AGENT_EVENT_ADAPTER.validate_python(heartbeat)
    assert payload_validator(document, "Heartbeat").is_valid(heartbeat)
    assert not payload_validator(document, "Heartbeat").is_valid(heartbeat | {"type": "install"})
    event = LicenseEvent(
        event_id="x",
        type="license.allocated",
        customer_id="c-1",
        subject_type="device",
        subject_id="d-1",
        reason="first_signal",
        effective_at="2026-11-30T10:00:00Z",  # type: ignore[arg-type]
        emitted_at="2026-11-30T10:00:00Z",  # type: ignore[arg-type]
        sequence=1,
    )
    assert payload_validator(document, "LicenseEvent").is_valid(event.model_dump(mode="json"))


def test_license_event_headers_name_the_event_id_and_the_signature() -> None:
    document = build_asyncapi_document()
    headers = document["components"]["messages"]["licenseEvent"]["headers"]
    assert headers["required"] == ["event_id"]
    assert set(headers["properties"]) == {"event_id", "sig.key_id", "sig.hmac"}
    assert "LICENSE_EVENTS_SIGNING_KEY_FILE" in headers["description"]
    assert "license-telemetry/license-event/v1" in headers["description"]
    keys = SigningKeys({"2026-12": b"k" * 32}, current="2026-12")
    signed = [("event_id", b"0b6f5a52-3c0e-8d5e-9a0b-4b1f0e0c1d2e")]
    signed += license_event_headers(keys, b"acme", b"{}")
    as_text = {name: value.decode("ascii") for name, value in signed}
    assert not list(Draft202012Validator(headers).iter_errors(as_text))
    assert list(Draft202012Validator(headers).iter_errors({**as_text, "sig.hmac": "XYZ"}))
