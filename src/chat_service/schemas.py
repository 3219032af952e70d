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
    refresh_token: str = Field(max_length=256)


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
