"""The WebSocket protocol's frames as typed models: what clients send and what they receive.

Client frames are parsed strictly (unknown fields are an error). Server frames are documented
here and in openapi/asyncapi.yaml (generated from these models); the hot fan-out path encodes
the same shapes straight from dicts, once per event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from chat_service.schemas import ClientId, MessagePublic, UserSummary

PROTOCOL = "chat.v1"
BEARER_PREFIX = "bearer."

Ref = Annotated[
    str | int | None,
    Field(default=None, description="Any id of yours; echoed in the reply or error"),
]
RoomId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ClientFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ref: Ref = None


class Join(ClientFrame):
    """Subscribe to a room (joining a public room makes me a member) and get its history."""

    type: Literal["join"]
    room_id: RoomId
    since_seq: int | None = Field(
        default=None, ge=0, le=2**62, description="Every change after this seq, in seq order"
    )
    limit: int | None = Field(
        default=None, ge=1, le=200, description="Without since_seq: the last `limit` messages"
    )


class Leave(ClientFrame):
    """Unsubscribe from a room; membership stays."""

    type: Literal["leave"]
    room_id: RoomId


class MessageSend(ClientFrame):
    """Store a message; `ack` follows once it is committed."""

    type: Literal["message.send"]
    room_id: RoomId
    body: str
    client_id: ClientId


class Typing(ClientFrame):
    """Tell the room's other subscribers I am typing (not stored; throttled)."""

    type: Literal["typing"]
    room_id: RoomId


class Read(ClientFrame):
    """Move my read cursor in a room."""

    type: Literal["read"]
    room_id: RoomId
    seq: int = Field(ge=0, le=2**62)


class Ping(ClientFrame):
    """Application-level keepalive; the server answers `pong`."""

    type: Literal["ping"]


class AuthRefresh(ClientFrame):
    """Give the connection a fresh access token (same user) before the old one expires."""

    type: Literal["auth.refresh"]
    access_token: str = Field(max_length=4096)


CLIENT_FRAMES: dict[str, type[ClientFrame]] = {
    "join": Join,
    "leave": Leave,
    "message.send": MessageSend,
    "typing": Typing,
    "read": Read,
    "ping": Ping,
    "auth.refresh": AuthRefresh,
}


# --- server frames --------------------------------------------------------------------------


# Optional top-level fields left out of a frame when they have no value.
OMITTED_WHEN_NONE = ("ref", "retry_after", "reason")


class ServerFrame(BaseModel):
    def encode(self) -> bytes:
        omit = {name for name in OMITTED_WHEN_NONE if getattr(self, name, None) is None}
        return encode(self.model_dump(mode="json", exclude=omit))


class Limits(BaseModel):
    message_max_chars: int
    frame_max_bytes: int
    messages_per_s: int
    message_burst: int
    max_rooms: int


class Hello(ServerFrame):
    """The first frame on every connection: who I am and the limits that apply."""

    type: Literal["hello"] = "hello"
    user: UserSummary
    connection_id: str
    heartbeat_s: float
    limits: Limits
    expires_at: datetime


class Joined(ServerFrame):
    """The reply to `join`: the room's history, consistent with `last_seq`, and who is online."""

    type: Literal["joined"] = "joined"
    ref: Ref = None
    room_id: str
    messages: list[MessagePublic]
    last_seq: int = Field(description="The room's last seq when the history was read")
    truncated: bool = Field(description="More changes than fit: page the rest with REST")
    online: list[UserSummary]


class Left(ServerFrame):
    """The reply to `leave`."""

    type: Literal["left"] = "left"
    ref: Ref = None
    room_id: str


class Ack(ServerFrame):
    """The reply to `message.send`: the message is committed."""

    type: Literal["ack"] = "ack"
    ref: Ref = None
    client_id: str
    message: MessagePublic


class MessageEvent(ServerFrame):
    """A message in a joined room was sent, edited or deleted."""

    type: Literal["message.new", "message.updated", "message.deleted"]
    room_id: str
    message: MessagePublic


class Presence(ServerFrame):
    """A user's first connection joined the room, or the last one left it."""

    type: Literal["presence"] = "presence"
    room_id: str
    user: UserSummary
    status: Literal["online", "offline"]


class TypingEvent(ServerFrame):
    """Another user is typing in a joined room."""

    type: Literal["typing"] = "typing"
    room_id: str
    user: UserSummary


class RoomUpdated(ServerFrame):
    """A joined room's name, description or visibility changed."""

    type: Literal["room.updated"] = "room.updated"
    room_id: str
    room: dict[str, Any]


class RoomGone(ServerFrame):
    """The room was deleted, or I left it or was removed: its subscription has ended."""

    type: Literal["room.deleted", "room.removed"]
    room_id: str
    reason: str | None = None


class AuthExpiring(ServerFrame):
    """The access token expires soon: send `auth.refresh`, or the socket closes 4401."""

    type: Literal["auth.expiring"] = "auth.expiring"
    expires_at: datetime


class AuthRefreshed(ServerFrame):
    """The reply to `auth.refresh`."""

    type: Literal["auth.refreshed"] = "auth.refreshed"
    ref: Ref = None
    expires_at: datetime


class Pong(ServerFrame):
    """The reply to `ping`."""

    type: Literal["pong"] = "pong"
    ref: Ref = None


ErrorCode = Literal[
    "invalid_json",
    "invalid_frame",
    "unknown_type",
    "not_found",
    "forbidden",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
]


class Error(ServerFrame):
    """A frame could not be handled; the connection stays open."""

    type: Literal["error"] = "error"
    code: ErrorCode
    detail: str
    ref: Ref = None
    retry_after: int | None = Field(default=None, description="Seconds, with rate_limited")


SERVER_FRAMES: list[type[ServerFrame]] = [
    Hello,
    Joined,
    Left,
    Ack,
    MessageEvent,
    Presence,
    TypingEvent,
    RoomUpdated,
    RoomGone,
    AuthExpiring,
    AuthRefreshed,
    Pong,
    Error,
]


def encode(frame: dict[str, Any]) -> bytes:
    """A frame from plain values; datetimes written as pydantic writes them."""
    return orjson.dumps(frame, option=orjson.OPT_UTC_Z)


def ack(ref: Ref, client_id: str, message: dict[str, Any]) -> bytes:
    """`Ack` written from the message's plain fields (domain/history.py `MessageFields`):
    one per send, so no model is built for it."""
    frame: dict[str, Any] = {"type": "ack"}
    if ref is not None:
        frame["ref"] = ref
    frame |= {"client_id": client_id, "message": message}
    return encode(frame)
