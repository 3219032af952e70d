"""The AsyncAPI 3 document of the WebSocket protocol, generated from the frame models.

openapi/asyncapi.yaml is this module's output; a test keeps the two equal and checks every
frame the test suite receives against the schemas in it.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chat_service import __version__
from chat_service.realtime import frames

REGENERATE_COMMAND = "uv run chat-service asyncapi --output openapi/asyncapi.yaml"
REF = "#/components/schemas/{model}"

DESCRIPTION = """\
The chat-service WebSocket protocol, v1. Frames are JSON text, one object per frame, with a
`type`. Client frames may carry `ref`, echoed in the reply or error. The guide with examples,
ordering promises and the reconnect recipe is docs/protocol.md.

Authentication happens in the handshake, one of: `Authorization: Bearer <access token>`;
subprotocols `chat.v1, bearer.<access token>` (the server selects `chat.v1`); or
`?ticket=<ticket>` from `POST /api/v1/auth/ws-ticket`. A refused handshake is accepted and
closed at once with a code the client can see.

Close codes: 1000 normal; 1009 frame over the size limit; 1011 internal error; 1012 server
restarting (reconnect with jittered backoff and resume); 1013 overloaded; 4401 credentials
missing, invalid, expired or revoked (get a new token first); 4403 forbidden (origin, disabled
user: do not reconnect); 4404 room not found (room URL form); 4408 too slow, the outbound queue
overflowed (reconnect and resume with since_seq); 4429 too many connections or sustained
flooding (back off as the reason says).
"""

# (model, message name, summary) in the order a reader meets them.
CLIENT_MESSAGES: list[tuple[type[BaseModel], str]] = [
    (frames.Join, "join"),
    (frames.Leave, "leave"),
    (frames.MessageSend, "message.send"),
    (frames.Typing, "typing"),
    (frames.Read, "read"),
    (frames.Ping, "ping"),
    (frames.AuthRefresh, "auth.refresh"),
]
SERVER_MESSAGES: list[tuple[type[BaseModel], str]] = [
    (frames.Hello, "hello"),
    (frames.Joined, "joined"),
    (frames.Left, "left"),
    (frames.Ack, "ack"),
    (frames.MessageEvent, "message.event"),
    (frames.Presence, "presence"),
    (frames.TypingEvent, "typing.event"),
    (frames.RoomUpdated, "room.updated"),
    (frames.RoomGone, "room.gone"),
    (frames.AuthExpiring, "auth.expiring"),
    (frames.AuthRefreshed, "auth.refreshed"),
    (frames.Pong, "pong"),
    (frames.Error, "error"),
]


def build_document() -> dict[str, Any]:
    models = [(model, "validation") for model, _ in CLIENT_MESSAGES]
    models += [(model, "serialization") for model, _ in SERVER_MESSAGES]
    _, schema = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    messages = {
        _key(name): _message(model, name) for model, name in CLIENT_MESSAGES + SERVER_MESSAGES
    }
    channel_messages = {key: {"$ref": f"#/components/messages/{key}"} for key in messages}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "chat-service WebSocket",
            "version": __version__,
            "description": DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:8000",
                "protocol": "ws",
                "description": "`chat-service serve` with its defaults",
            }
        },
        "channels": {
            "chat": {
                "address": "/ws",
                "title": "The connection",
                "messages": channel_messages,
            },
            "room": {
                "address": "/ws/rooms/{room_id}",
                "title": "The connection, with one room joined at connect",
                "parameters": {
                    "room_id": {"description": "The room to join (close 4404 if not visible)"}
                },
                "messages": channel_messages,
            },
        },
        "operations": {
            **_operations("receive", CLIENT_MESSAGES, "The client sends"),
            **_operations("send", SERVER_MESSAGES, "The server sends"),
        },
        "components": {"messages": messages, "schemas": schema["$defs"]},
    }


def _key(name: str) -> str:
    return name.replace(".", "_")


def _message(model: type[BaseModel], name: str) -> dict[str, Any]:
    summary = (model.__doc__ or name).strip().splitlines()[0]
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "payload": {"$ref": REF.format(model=model.__name__)},
    }


def _operations(
    action: str, messages: list[tuple[type[BaseModel], str]], summary: str
) -> dict[str, Any]:
    operations = {}
    for _, name in messages:
        key = _key(name)
        operations[f"{action}_{key}"] = {
            "action": action,
            "summary": f"{summary} `{name}`",
            "channel": {"$ref": "#/channels/chat"},
            "messages": [{"$ref": f"#/channels/chat/messages/{key}"}],
        }
    return operations


class _Dumper(yaml.SafeDumper):
    """Readable YAML: block style for multi-line text, no anchors for repeated parts."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render_asyncapi() -> str:
    return yaml.dump(
        build_document(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
