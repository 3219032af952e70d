"""openapi/asyncapi.yaml: generated from the frame models, complete, and self-consistent."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from chat_service.realtime import frames
from chat_service.realtime.asyncapi import REGENERATE_COMMAND, render_asyncapi
from tests.frame_schemas import ASYNCAPI, MESSAGE_OF_TYPE, document, validate_server_frame


def test_committed_document_matches_the_models() -> None:
    assert ASYNCAPI.read_text() == render_asyncapi(), (
        f"openapi/asyncapi.yaml is stale: run `{REGENERATE_COMMAND}`"
    )


def _resolve(ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document()
    for part in ref[2:].split("/"):
        assert part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_document_shape_and_references() -> None:
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert {"title", "version", "description"} <= set(doc["info"])
    assert {channel["address"] for channel in doc["channels"].values()} == {
        "/ws",
        "/ws/rooms/{room_id}",
    }
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(ref)
    for name, operation in doc["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        assert _resolve(operation["channel"]["$ref"]) in doc["channels"].values()


def test_every_client_frame_is_documented_as_received() -> None:
    operations = document()["operations"].values()
    received = {
        _resolve(_resolve(op["messages"][0]["$ref"])["$ref"])["name"]
        for op in operations
        if op["action"] == "receive"
    }
    assert received == set(frames.CLIENT_FRAMES)


def test_every_server_frame_type_is_documented() -> None:
    types = set()
    for model in frames.SERVER_FRAMES:
        types |= set(get_args(model.model_fields["type"].annotation))
    assert types == set(MESSAGE_OF_TYPE)
    for message in set(MESSAGE_OF_TYPE.values()):
        assert message in document()["components"]["messages"]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "pong", "ref": [7]},
        {"type": "error", "code": "teapot", "detail": "x"},
        {"type": "ack", "client_id": "c"},
        {"type": "presence", "room_id": "r", "user": {"id": "u"}, "status": "away"},
        {"type": "martian"},
    ],
    ids=["ref-not-scalar", "unknown-code", "ack-no-message", "bad-status", "unknown-type"],
)
def test_validation_catches_wrong_frames(frame: dict[str, Any]) -> None:
    validate_server_frame({"type": "pong", "ref": 7})
    with pytest.raises(AssertionError):
        validate_server_frame(frame)
