"""Reading messages: history pages (REST) and the snapshot a WebSocket join starts from.

Each read is one statement below the ORM: the room with my membership, outer-joined with
the page of messages and their authors, as plain rows. Being one statement, it reads one
snapshot of the database: the access it checks and the messages it returns agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import SQLModel

from chat_service.db import SessionFactory, statement_options
from chat_service.domain.access import PUBLIC, NotMember, RoomNotFound, user_summary
from chat_service.errors import InvalidInput
from chat_service.models import Message, User
from chat_service.schemas import MessagePage, MessagePublic

# MessagePublic's fields as plain values, in its order: the author a plain dict, datetimes
# as datetime. What frames and events carry, for orjson to write as pydantic would
# (`orjson.OPT_UTC_Z`) without building a model per message.
MessageFields = dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """History for a WebSocket join, consistent with `last_seq`: every change up to it is in
    `messages` (unless `truncated`), and every later change is a live event."""

    messages: list[MessageFields]
    last_seq: int
    truncated: bool


class HistoryService:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def page(
        self,
        user_id: str,
        room_id: str,
        *,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int = 50,
    ) -> MessagePage:
        """A page of messages, ascending.

        `after_seq`: every message changed after that seq (new, edited or deleted), in change
        order, each in its latest state. Otherwise the newest messages before `before_seq`.
        """
        if before_seq is not None and after_seq is not None:
            raise InvalidInput("Give before_seq or after_seq, not both", field="after_seq")
        params: dict[str, Any] = {"room_id": room_id, "user_id": user_id, "limit": limit + 1}
        if after_seq is not None:
            statement, params["after"] = PAGE_AFTER, after_seq
        elif before_seq is not None:
            statement, params["before"] = PAGE_BEFORE, before_seq
        else:
            statement = PAGE_LATEST
        _, rows = await self._read(statement, params)
        has_more = len(rows) > limit
        if has_more:  # the extra row lies beyond the page: oldest first, or last when forward
            rows = rows[:-1] if after_seq is not None else rows[1:]
        return MessagePage.model_validate(
            {"items": [_message_fields(row) for row in rows], "has_more": has_more}
        )

    async def snapshot(
        self, user_id: str, room_id: str, *, since_seq: int | None, limit: int, cap: int
    ) -> Snapshot:
        """The last `limit` messages, or (with `since_seq`) up to `cap` changes after it."""
        params: dict[str, Any] = {"room_id": room_id, "user_id": user_id}
        if since_seq is None:
            statement, params["limit"] = SNAPSHOT_LATEST, limit
        else:
            statement, params["limit"], params["since"] = SNAPSHOT_SINCE, cap + 1, since_seq
        # In a transaction, not autocommit: the ROLLBACK round trip after the read lets the
        # events of changes committed just before it reach the hub before `joined` is sent;
        # one arriving after would be repeated live (Hub.finish_join keeps no per-connection
        # floor yet), against the protocol's promise.
        last_seq, rows = await self._read(statement, params, autocommit=False)
        truncated = len(rows) > cap
        return Snapshot([_message_fields(row) for row in rows[:cap]], last_seq, truncated)

    async def _read(
        self, statement: sa.Select[Any], params: dict[str, Any], *, autocommit: bool = True
    ) -> tuple[int, list[Any]]:
        """The room's last_seq and the page's rows, ascending, once my access to the room is
        checked: the errors of `room_access(...).member()`."""
        async with self._sessions() as db:
            options = statement_options(db) if autocommit else {}
            connection = await db.connection(execution_options=options)
            rows = (await connection.execute(statement, params)).all()
        if not rows:
            raise RoomNotFound()
        access = rows[0]
        if access.member is None:
            if access.visibility != PUBLIC:
                raise RoomNotFound()
            raise NotMember()
        return access.last_seq, [] if access.id is None else rows


# Below the ORM: tables, and statements built once (only their parameters vary per call).
MESSAGES = SQLModel.metadata.tables["messages"]
USERS = SQLModel.metadata.tables["users"]
ROOMS = SQLModel.metadata.tables["rooms"]
MEMBERSHIPS = SQLModel.metadata.tables["memberships"]

# MessagePublic's fields, in its order; the author's flattened.
MESSAGE_COLUMNS = (
    MESSAGES.c.id,
    MESSAGES.c.room_id,
    MESSAGES.c.seq,
    MESSAGES.c.change_seq,
    MESSAGES.c.author_id,
    USERS.c.username,
    USERS.c.display_name,
    MESSAGES.c.body,
    MESSAGES.c.client_id,
    MESSAGES.c.created_at,
    MESSAGES.c.edited_at,
    MESSAGES.c.deleted,
)


# The room's last_seq. Read in the same statement as the messages, it bounds them: every
# change up to it is committed, and nothing after it is returned (that comes live).
LAST_SEQ = (
    sa.select(ROOMS.c.last_seq).where(ROOMS.c.id == sa.bindparam("room_id")).scalar_subquery()
)


def _with_access(
    *conditions: sa.ColumnElement[bool], by: sa.Column[int], newest: bool
) -> sa.Select[Any]:
    """The room's visibility and last_seq, my membership (`member`, NULL if none) and a page
    of the room's messages by `by` (the newest `limit`, or the first `limit` after a bound),
    one row per message ascending. An empty page gives one row with NULL message columns;
    a room that does not exist gives no row."""
    page = (
        sa.select(*MESSAGE_COLUMNS)
        .select_from(MESSAGES.join(USERS, USERS.c.id == MESSAGES.c.author_id))
        .where(MESSAGES.c.room_id == sa.bindparam("room_id"), *conditions)
        .order_by(by.desc() if newest else by)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .subquery("page")
    )
    mine = sa.and_(
        MEMBERSHIPS.c.room_id == ROOMS.c.id,
        MEMBERSHIPS.c.user_id == sa.bindparam("user_id"),
    )
    return (
        sa.select(
            ROOMS.c.visibility,
            ROOMS.c.last_seq,
            MEMBERSHIPS.c.user_id.label("member"),
            *page.c,
        )
        .select_from(ROOMS.outerjoin(MEMBERSHIPS, mine).outerjoin(page, sa.true()))
        .where(ROOMS.c.id == sa.bindparam("room_id"))
        .order_by(page.c[by.name])
    )


_seq, _change_seq = MESSAGES.c.seq, MESSAGES.c.change_seq
SNAPSHOT_LATEST = _with_access(_seq <= LAST_SEQ, by=_seq, newest=True)
SNAPSHOT_SINCE = _with_access(
    _change_seq > sa.bindparam("since"), _change_seq <= LAST_SEQ, by=_change_seq, newest=False
)
PAGE_LATEST = _with_access(by=_seq, newest=True)
PAGE_BEFORE = _with_access(_seq < sa.bindparam("before"), by=_seq, newest=True)
PAGE_AFTER = _with_access(_change_seq > sa.bindparam("after"), by=_change_seq, newest=False)


def _message_fields(row: Sequence[Any]) -> MessageFields:
    """A row of `_with_access` as MessagePublic's fields. Unpacked by position: attribute
    access on a Row costs ten times as much, and this runs for every message read."""
    (
        _visibility,
        _last_seq,
        _member,
        message_id,
        room_id,
        seq,
        change_seq,
        author_id,
        username,
        display_name,
        body,
        client_id,
        created_at,
        edited_at,
        deleted,
    ) = row
    return {
        "id": message_id,
        "room_id": room_id,
        "seq": seq,
        "change_seq": change_seq,
        "author": {"id": author_id, "username": username, "display_name": display_name},
        "body": body,
        "client_id": client_id,
        "created_at": created_at,
        "edited_at": edited_at,
        "deleted": deleted,
    }


def message_public(message: Message, author: User) -> MessagePublic:
    return MessagePublic(
        id=message.id,
        room_id=message.room_id,
        seq=message.seq,
        change_seq=message.change_seq,
        author=user_summary(author),
        body=message.body,
        client_id=message.client_id,
        created_at=message.created_at,
        edited_at=message.edited_at,
        deleted=message.deleted,
    )
