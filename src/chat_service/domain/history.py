"""Reading messages: history pages (REST) and the snapshot a WebSocket join starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from chat_service.db import SessionFactory
from chat_service.domain.access import room_access, user_summary
from chat_service.errors import InvalidInput
from chat_service.models import Message, User
from chat_service.schemas import MessagePage, MessagePublic


@dataclass(frozen=True)
class Snapshot:
    """History for a WebSocket join, consistent with `last_seq`: every change up to it is in
    `messages` (unless `truncated`), and every later change is a live event."""

    messages: list[MessagePublic]
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
        statement = with_authors(room_id).limit(limit + 1)
        if after_seq is not None:
            statement = statement.where(col(Message.change_seq) > after_seq).order_by(
                col(Message.change_seq)
            )
        else:
            if before_seq is not None:
                statement = statement.where(col(Message.seq) < before_seq)
            statement = statement.order_by(col(Message.seq).desc())
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).member()
            rows = list((await db.exec(statement)).all())
        has_more = len(rows) > limit
        rows = rows[:limit]
        if after_seq is None:
            rows.reverse()
        return MessagePage(items=[message_public(m, u) for m, u in rows], has_more=has_more)

    async def snapshot(
        self, user_id: str, room_id: str, *, since_seq: int | None, limit: int, cap: int
    ) -> Snapshot:
        """The last `limit` messages, or (with `since_seq`) up to `cap` changes after it."""
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            access.member()
            # Read first: a committed last_seq means every change up to it is committed too.
            last_seq = access.room.last_seq
            statement = with_authors(room_id)
            if since_seq is None:
                statement = statement.where(col(Message.seq) <= last_seq)
                statement = statement.order_by(col(Message.seq).desc()).limit(limit)
            else:
                statement = statement.where(
                    col(Message.change_seq) > since_seq, col(Message.change_seq) <= last_seq
                )
                statement = statement.order_by(col(Message.change_seq)).limit(cap + 1)
            rows = list((await db.exec(statement)).all())
        if since_seq is None:
            rows.reverse()
        truncated = len(rows) > cap
        return Snapshot([message_public(m, u) for m, u in rows[:cap]], last_seq, truncated)


def with_authors(room_id: str) -> Any:
    """A room's messages, each with its author row."""
    return (
        select(Message, User)
        .join(User, col(User.id) == Message.author_id)
        .where(col(Message.room_id) == room_id)
    )


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
