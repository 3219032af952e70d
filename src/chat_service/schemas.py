"""Request and response bodies of the REST API, kept apart from the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Username = Annotated[
    str,
    StringConstraints(min_length=3, max_length=32, pattern=r"^[A-Za-z0-9_.\-]+$"),
    Field(description="3-32 characters of A-Z a-z 0-9 _ . - ; unique case-insensitively"),
]
# Counted in characters (code points), never truncated: any Unicode is fine.
Password = Annotated[
    str,
    StringConstraints(min_length=8, max_length=128),
    Field(description="8-128 characters, any Unicode"),
]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class Body(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class UserCreate(Body):
    username: Username
    password: Password
    display_name: DisplayName | None = Field(
        default=None, description="Shown in chats; the username when omitted"
    )


class LoginRequest(Body):
    # Loose on purpose: a malformed username must fail like an unknown one (401), not 422.
    username: str = Field(max_length=256)
    password: str = Field(max_length=1024)


class RefreshRequest(Body):
    # Roomy on purpose: any wrong token, an access token included, answers 401, not 422.
    refresh_token: str = Field(max_length=4096)


class UserPublic(BaseModel):
    id: str
    username: str
    display_name: str
    created_at: datetime


class TokenPair(BaseModel):
    access_token: str = Field(description="JWT for `Authorization: Bearer`")
    refresh_token: str = Field(description="Opaque, single-use: POST /auth/refresh swaps it")
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


class AuthResult(TokenPair):
    user: UserPublic


class WsTicket(BaseModel):
    ticket: str = Field(description="Single-use; connect with /ws?ticket=<ticket>")
    expires_in: int = Field(description="Seconds the ticket stays valid")


class HealthStatus(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str] = Field(default_factory=dict)


# --- rooms ----------------------------------------------------------------------------------

Visibility = Literal["public", "private"]
Role = Literal["owner", "member"]
RoomName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
RoomDescription = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)]


class RoomCreate(Body):
    name: RoomName
    description: RoomDescription = ""
    visibility: Visibility = "public"


class RoomUpdate(Body):
    """Only the fields given change."""

    name: RoomName | None = None
    description: RoomDescription | None = None
    visibility: Visibility | None = None


class RoomPublic(BaseModel):
    id: str
    name: str
    description: str
    visibility: Visibility
    owner_id: str
    created_at: datetime
    member_count: int


class RoomListItem(RoomPublic):
    role: Role | None = Field(description="My role; null when I am not a member")
    last_seq: int | None = Field(description="Seq of the room's newest change (members only)")
    unread_count: int | None = Field(
        description="Messages from others after my read cursor (members only)"
    )


class RoomPage(BaseModel):
    items: list[RoomListItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end")


class UserSummary(BaseModel):
    id: str
    username: str
    display_name: str


class MembershipPublic(BaseModel):
    room_id: str
    user: UserSummary
    role: Role
    joined_at: datetime
    last_read_seq: int


class MemberPublic(MembershipPublic):
    online: bool


class MemberPage(BaseModel):
    items: list[MemberPublic]
    next_cursor: str | None


class MemberAdd(Body):
    username: str = Field(max_length=256)


# --- messages -------------------------------------------------------------------------------

ClientId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$"),
    Field(
        description="Your id for this send (1-64 printable ASCII): resending it never duplicates"
    ),
]


class MessageCreate(Body):
    body: str = Field(description="1 to MESSAGE_MAX_CHARS characters, not only whitespace")
    client_id: ClientId | None = None


class MessageUpdate(Body):
    body: str


class MessagePublic(BaseModel):
    id: str
    room_id: str
    seq: int = Field(description="Position in the room, fixed at creation")
    change_seq: int = Field(description="Seq of this message's latest change (edit or delete)")
    author: UserSummary
    body: str = Field(description="Empty once deleted")
    client_id: str | None
    created_at: datetime
    edited_at: datetime | None
    deleted: bool


class MessagePage(BaseModel):
    items: list[MessagePublic]
    has_more: bool = Field(description="More messages lie beyond this page in its direction")


class ReadCursor(Body):
    seq: int = Field(ge=0, description="The newest seq I have read")
