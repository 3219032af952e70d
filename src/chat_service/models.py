"""Database tables. API schemas live in schemas.py, apart from these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from chat_service.clock import utcnow
from chat_service.ids import new_id

# Deterministic constraint names, so Alembic migrations name them the same on every backend.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware timestamp that comes back as UTC even from SQLite, which drops zones."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _fk(target: str, *, index: bool = False) -> Any:
    return Field(
        sa_column_args=[sa.ForeignKey(target, ondelete="CASCADE")],
        max_length=32,
        index=index,
    )


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    username: str = Field(max_length=32)
    # Lower-cased username: uniqueness is case-insensitive on every backend.
    username_key: str = Field(max_length=32, unique=True)
    display_name: str = Field(max_length=64)
    password_hash: str = Field(max_length=255)
    disabled: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class AuthSession(SQLModel, table=True):
    """One login: the family of refresh tokens that rotate from it."""

    __tablename__ = "auth_sessions"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    user_id: str = _fk("users.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_reason: str | None = Field(default=None, max_length=32)


class RefreshToken(SQLModel, table=True):
    __tablename__ = "refresh_tokens"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    session_id: str = _fk("auth_sessions.id", index=True)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class WsTicket(SQLModel, table=True):
    __tablename__ = "ws_tickets"

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = _fk("users.id")
    session_id: str = _fk("auth_sessions.id", index=True)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class Room(SQLModel, table=True):
    __tablename__ = "rooms"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(max_length=100)
    description: str = Field(default="", max_length=1000)
    visibility: str = Field(default="public", max_length=16, index=True)
    owner_id: str = _fk("users.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # The seq of the newest change; the next change takes last_seq + 1 in its own transaction.
    last_seq: int = Field(default=0, sa_type=sa.BigInteger)


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"

    room_id: str = Field(
        sa_column_args=[sa.ForeignKey("rooms.id", ondelete="CASCADE")],
        primary_key=True,
        max_length=32,
    )
    user_id: str = Field(
        sa_column_args=[sa.ForeignKey("users.id", ondelete="CASCADE")],
        primary_key=True,
        max_length=32,
        index=True,
    )
    role: str = Field(default="member", max_length=16)
    joined_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_read_seq: int = Field(default=0, sa_type=sa.BigInteger)


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        sa.UniqueConstraint("room_id", "seq"),
        sa.UniqueConstraint("room_id", "change_seq"),
        sa.UniqueConstraint("author_id", "client_id"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    room_id: str = _fk("rooms.id")
    seq: int = Field(sa_type=sa.BigInteger)
    # The seq of this message's latest change (itself when new; later for edits and deletes).
    change_seq: int = Field(sa_type=sa.BigInteger)
    author_id: str = _fk("users.id")
    body: str = Field(sa_type=sa.Text)
    client_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    edited_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    deleted: bool = Field(default=False)
