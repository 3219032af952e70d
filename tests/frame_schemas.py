"""Server frames checked against openapi/asyncapi.yaml, the document frontends build from."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ASYNCAPI = Path(__file__).parents[1] / "openapi" / "asyncapi.yaml"

# Frame type -> the message (in components/messages) that describes it.
MESSAGE_OF_TYPE = {
    "hello": "hello",
    "joined": "joined",
    "left": "left",
    "ack": "ack",
    "message.new": "message_event",
    "message.updated": "message_event",
    "message.deleted": "message_event",
    "presence": "presence",
    "typing": "typing_event",
    "room.updated": "room_updated",
    "room.deleted": "room_gone",
    "room.removed": "room_gone",
    "auth.expiring": "auth_expiring",
    "auth.refreshed": "auth_refreshed",
    "pong": "pong",
    "error": "error",
}


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text())
    return loaded


@cache
def _validator(message: str) -> jsonschema.Draft202012Validator:
    payload_ref = document()["components"]["messages"][message]["payload"]["$ref"]
    schema = {"$ref": payload_ref, "components": document()["components"]}
    return jsonschema.Draft202012Validator(schema)


def validate_server_frame(frame: dict[str, Any]) -> None:
    """Raise if a frame the server sent does not match its documented schema."""
    message = MESSAGE_OF_TYPE.get(frame.get("type", ""))
    if message is None:
        raise AssertionError(f"undocumented frame type: {frame!r}")
    errors = sorted(_validator(message).iter_errors(frame), key=str)
    if errors:
        raise AssertionError(f"frame does not match asyncapi.yaml ({message}): {errors[0]}")
