"""Messages: send (idempotent by client_id), edit, delete, read cursors.

Every change in a room takes the next seq from `rooms.last_seq` in the transaction that writes
it. The UPDATE that takes it locks the room's row until commit, so changes in one room commit
one after another in seq order, and "everything after seq N" never skips a change.

Sends are group-committed (domain/group_commit.py): the sends that arrive while a transaction
is in flight are checked, numbered and stored together in the next one, rooms locked in id
order. Each still gets its own answer, and an ack still means its transaction committed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from limits import RateLimitItemPerSecond
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel, col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.clock import utcnow
from chat_service.db import SessionFactory
from chat_service.domain.access import OWNER, PUBLIC, NotMember, RoomNotFound, room_access
from chat_service.domain.events import Event, EventSink, EventType
from chat_service.domain.group_commit import GroupCommit
from chat_service.domain.history import message_public
from chat_service.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from chat_service.ids import new_id
from chat_service.models import Membership, Message, Room, User
from chat_service.ratelimit import RateLimiter, Rule
from chat_service.schemas import MessagePublic, UserSummary
from chat_service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sent:
    message: MessagePublic
    created: bool  # False: this client_id was sent before and `message` is the original


@dataclass(frozen=True)
class Draft:
    """A send waiting for its transaction."""

    user_id: str
    room_id: str
    body: str
    client_id: str | None
    on_stored: Callable[[Sent], None] | None = None


@dataclass(frozen=True)
class _Same:
    """This draft repeats the client_id of an earlier one in its batch: same answer."""

    index: int


# A draft's answer while its batch is being worked out.
_Pending = Sent | BaseException | _Same | None

# Sends stored by one transaction at most; more wait for the next one.
MAX_BATCH = 256


class MessageService:
    def __init__(
        self,
        sessions: SessionFactory,
        events: EventSink,
        limiter: RateLimiter,
        settings: Settings,
    ) -> None:
        self._sessions = sessions
        self._events = events
        self._limiter = limiter
        self._max_chars = settings.message_max_chars
        # MESSAGE_BURST sends per ceil(burst / rate) seconds, per user, wherever they come from.
        period = max(1, math.ceil(settings.message_burst / settings.message_rate_per_s))
        self._rate = Rule("messages", RateLimitItemPerSecond(settings.message_burst, period))
        self._batches = GroupCommit[Draft, Sent](self._store, MAX_BATCH)

    async def send(
        self,
        user_id: str,
        room_id: str,
        body: str,
        client_id: str | None = None,
        on_stored: Callable[[Sent], None] | None = None,
    ) -> Sent:
        """Store a message (or find the one sent before with this client_id).

        `on_stored` is called once it is committed and before it is announced, so a sender's
        `ack` goes out ahead of its `message.new`, even if the sender stops waiting.
        """
        self._check_body(body)
        return await self._batches.submit(Draft(user_id, room_id, body, client_id, on_stored))

    async def _store(self, drafts: list[Draft]) -> list[Sent | BaseException]:
        """One transaction for a batch of sends; each gets its message or its error."""
        outcomes: list[_Pending] = [None] * len(drafts)
        try:
            async with self._sessions() as db:
                fresh, authors = await self._fresh_drafts(db, drafts, outcomes)
                stored = await self._insert(db, [drafts[i] for i in fresh], authors)
                await db.commit()
        except IntegrityError:
            # A client_id committed concurrently by another transaction (another worker):
            # one at a time, the way that sorts it out. (Fresh drafts pay their rate budget
            # twice here; this is rare.)
            log.info("a batch met a concurrent client_id; storing its sends one by one")
            results = [await self._send_alone(draft) for draft in drafts]
        else:
            for index, sent in zip(fresh, stored, strict=True):
                outcomes[index] = sent
            results = [_resolve(outcomes, index) for index in range(len(drafts))]
        for draft, result in zip(drafts, results, strict=True):
            if isinstance(result, Sent):
                if draft.on_stored is not None:
                    draft.on_stored(result)
                if result.created:
                    self._announce("message.new", result.message)
        return results

    async def _fresh_drafts(
        self, db: AsyncSession, drafts: list[Draft], outcomes: list[_Pending]
    ) -> tuple[list[int], dict[str, UserSummary]]:
        """Settle the drafts that store nothing (no access, a resend, over the rate limit)
        in `outcomes`; return the indexes of those to store, and their authors. Only resends
        are free: sends refused for access count against the rate limit too (each costs
        queries)."""
        connection = await db.connection()
        members = await _member_authors(connection, drafts)
        denied = await _denied(connection, drafts, members)
        originals = await _originals(connection, drafts)
        first_of: dict[tuple[str, str], int] = {}
        fresh: list[int] = []
        for index, draft in enumerate(drafts):
            key = (draft.user_id, draft.client_id) if draft.client_id is not None else None
            allowed_in = index not in denied
            if allowed_in and key is not None and key in originals:
                outcomes[index] = _resend(originals[key], draft.room_id)
            elif allowed_in and key is not None and key in first_of:
                outcomes[index] = _Same(first_of[key])  # sent twice in one batch
            elif not await self._limiter.allow(self._rate, draft.user_id):
                outcomes[index] = await self._limiter.refusal(self._rate, draft.user_id)
            elif not allowed_in:
                outcomes[index] = denied[index]
            else:
                if key is not None:
                    first_of[key] = index
                fresh.append(index)
        return fresh, {user_id: author for (_, user_id), author in members.items()}

    async def _insert(
        self, db: AsyncSession, drafts: list[Draft], authors: dict[str, UserSummary]
    ) -> list[Sent]:
        """Number the drafts room by room and store them."""
        if not drafts:
            return []
        connection = await db.connection()
        next_seq = await _take_seqs(connection, Counter(draft.room_id for draft in drafts))
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for draft in drafts:
            seq = next_seq[draft.room_id]
            next_seq[draft.room_id] = seq + 1
            rows.append(
                {
                    "id": new_id(),
                    "room_id": draft.room_id,
                    "seq": seq,
                    "change_seq": seq,
                    "author_id": draft.user_id,
                    "body": draft.body,
                    "client_id": draft.client_id,
                    "created_at": now,
                    "edited_at": None,
                    "deleted": False,
                }
            )
        await connection.execute(INSERT_MESSAGES, rows)
        return [
            Sent(MessagePublic(**row, author=authors[row["author_id"]]), created=True)
            for row in rows
        ]

    async def _send_alone(self, draft: Draft) -> Sent | BaseException:
        try:
            return await self._send_one(draft.user_id, draft.room_id, draft.body, draft.client_id)
        except Exception as exc:  # this draft's answer, as a batch would have given it
            return exc

    async def _send_one(self, user_id: str, room_id: str, body: str, client_id: str | None) -> Sent:
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).member()
            if client_id is not None:
                original = await self._original(db, user_id, client_id, room_id)
                if original is not None:
                    return Sent(original, created=False)  # a resend costs no rate budget
            await self._limiter.hit(self._rate, user_id)
            author = await db.get_one(User, user_id)  # now: after the commit nothing may fail
            seq = await _next_seq(db, room_id)
            message = Message(
                room_id=room_id,
                seq=seq,
                change_seq=seq,
                author_id=user_id,
                body=body,
                client_id=client_id,
            )
            db.add(message)
            try:
                await db.commit()
            except IntegrityError:
                # The same client_id committed concurrently; its seq was rolled back with ours.
                await db.rollback()
                original = await self._original(db, user_id, client_id, room_id)
                if original is None:
                    raise
                return Sent(original, created=False)
            public = message_public(message, author)
        return Sent(public, created=True)

    async def edit(self, user_id: str, room_id: str, seq: int, body: str) -> MessagePublic:
        self._check_body(body)
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).member()
            change_seq = await _next_seq(db, room_id)  # lock first, then read the message
            message = await _message(db, room_id, seq)
            if message.author_id != user_id:
                raise Forbidden("Only the author can edit a message", code="not_author")
            if message.deleted:
                raise Conflict("This message was deleted", code="message_deleted")
            message.body = body
            message.change_seq = change_seq
            message.edited_at = utcnow()
            db.add(message)
            public = message_public(message, await db.get_one(User, message.author_id))
            await db.commit()
        self._announce("message.updated", public)
        return public

    async def delete(self, user_id: str, room_id: str, seq: int) -> None:
        """Remove the body and keep a tombstone; deleting a deleted message changes nothing."""
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            membership = access.member()
            change_seq = await _next_seq(db, room_id)
            message = await _message(db, room_id, seq)
            if message.author_id != user_id and membership.role != OWNER:
                raise Forbidden(
                    "Only the author or the room's owner can delete a message", code="not_author"
                )
            if message.deleted:
                return  # leaving the block without commit gives the seq back
            message.body = ""
            message.deleted = True
            message.change_seq = change_seq
            db.add(message)
            public = message_public(message, await db.get_one(User, message.author_id))
            await db.commit()
        self._announce("message.deleted", public)

    async def mark_read(self, user_id: str, room_id: str, seq: int) -> int:
        """Move my read cursor forward (never back, never past the room's last seq)."""
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            access.member()
            target = min(seq, access.room.last_seq)
            await db.exec(
                update(Membership)
                .where(
                    col(Membership.room_id) == room_id,
                    col(Membership.user_id) == user_id,
                    col(Membership.last_read_seq) < target,
                )
                .values(last_read_seq=target)
            )
            await db.commit()
        return target

    def _check_body(self, body: str) -> None:
        if not body.strip():
            raise InvalidInput("The message body is empty", field="body")
        if len(body) > self._max_chars:
            raise InvalidInput(
                f"The message body is longer than {self._max_chars} characters",
                field="body",
                code="too_large",
            )

    async def _original(
        self, db: AsyncSession, user_id: str, client_id: str | None, room_id: str
    ) -> MessagePublic | None:
        row = (
            await db.exec(
                select(Message, User)
                .join(User, col(User.id) == Message.author_id)
                .where(col(Message.author_id) == user_id, col(Message.client_id) == client_id)
            )
        ).first()
        if row is None:
            return None
        message, author = row
        if message.room_id != room_id:
            raise Conflict(
                "This client_id was already used for a message in another room",
                code="client_id_reused",
            )
        return message_public(message, author)

    def _announce(self, event_type: EventType, message: MessagePublic) -> None:
        self._events.publish(
            Event(event_type, {"message": message.model_dump(mode="json")}, room_id=message.room_id)
        )


def _resolve(outcomes: list[_Pending], index: int) -> Sent | BaseException:
    outcome = outcomes[index]
    if isinstance(outcome, _Same):
        first = _resolve(outcomes, outcome.index)
        return Sent(first.message, created=False) if isinstance(first, Sent) else first
    assert outcome is not None
    return outcome


def _resend(original: MessagePublic, room_id: str) -> Sent | BaseException:
    if original.room_id != room_id:
        return Conflict(
            "This client_id was already used for a message in another room",
            code="client_id_reused",
        )
    return Sent(original, created=False)  # a resend costs no rate budget


# The batch path works on tables, below the ORM (plain rows, no identity map), with its
# statements built once: a send is the hottest path of the service.
USERS = sa.table("users", sa.column("id"), sa.column("username"), sa.column("display_name"))
ROOMS = sa.table("rooms", sa.column("id"), sa.column("visibility"), sa.column("last_seq"))
MEMBERSHIPS = sa.table("memberships", sa.column("room_id"), sa.column("user_id"))
MESSAGES = SQLModel.metadata.tables["messages"]
ROOM_IDS: sa.BindParameter[list[str]] = sa.bindparam("room_ids", expanding=True)
USER_IDS: sa.BindParameter[list[str]] = sa.bindparam("user_ids", expanding=True)

SELECT_MEMBER_AUTHORS = (
    sa.select(MEMBERSHIPS.c.room_id, USERS.c.id, USERS.c.username, USERS.c.display_name)
    .join(USERS, USERS.c.id == MEMBERSHIPS.c.user_id)
    .where(MEMBERSHIPS.c.room_id.in_(ROOM_IDS), MEMBERSHIPS.c.user_id.in_(USER_IDS))
)
SELECT_VISIBILITY = sa.select(ROOMS.c.id, ROOMS.c.visibility).where(ROOMS.c.id.in_(ROOM_IDS))
SELECT_ORIGINALS = (
    sa.select(MESSAGES, USERS.c.username, USERS.c.display_name)
    .join(USERS, USERS.c.id == MESSAGES.c.author_id)
    .where(
        MESSAGES.c.author_id.in_(USER_IDS),
        MESSAGES.c.client_id.in_(sa.bindparam("client_ids", expanding=True)),
    )
)
LOCK_ROOMS = (
    sa.select(ROOMS.c.id).where(ROOMS.c.id.in_(ROOM_IDS)).order_by(ROOMS.c.id).with_for_update()
)
TAKE_SEQS_IN_ONE_ROOM = (
    sa.update(ROOMS)
    .where(ROOMS.c.id == sa.bindparam("room_id"))
    .values(last_seq=ROOMS.c.last_seq + sa.bindparam("count"))
    .returning(ROOMS.c.id, ROOMS.c.last_seq)
)
INSERT_MESSAGES = sa.insert(MESSAGES)


async def _member_authors(
    connection: AsyncConnection, drafts: list[Draft]
) -> dict[tuple[str, str], UserSummary]:
    """(room id, user id) -> the author, for the drafts whose author is in their room."""
    rows = await connection.execute(
        SELECT_MEMBER_AUTHORS,
        {
            "room_ids": list({d.room_id for d in drafts}),
            "user_ids": list({d.user_id for d in drafts}),
        },
    )
    return {
        (room_id, user_id): UserSummary(id=user_id, username=username, display_name=display_name)
        for room_id, user_id, username, display_name in rows
    }


async def _denied(
    connection: AsyncConnection,
    drafts: list[Draft],
    members: dict[tuple[str, str], UserSummary],
) -> dict[int, DomainError]:
    """The drafts whose author may not post in their room, with the error room_access gives."""
    outsiders = {
        index: draft
        for index, draft in enumerate(drafts)
        if (draft.room_id, draft.user_id) not in members
    }
    if not outsiders:
        return {}
    visibility = dict(
        (
            await connection.execute(
                SELECT_VISIBILITY, {"room_ids": list({d.room_id for d in outsiders.values()})}
            )
        ).all()
    )
    return {
        index: (NotMember() if visibility.get(draft.room_id) == PUBLIC else RoomNotFound())
        for index, draft in outsiders.items()
    }


async def _originals(
    connection: AsyncConnection, drafts: list[Draft]
) -> dict[tuple[str, str], MessagePublic]:
    """Messages already stored under the drafts' (author, client_id)."""
    keyed = {(d.user_id, d.client_id) for d in drafts if d.client_id is not None}
    if not keyed:
        return {}
    rows = await connection.execute(
        SELECT_ORIGINALS,
        {
            "user_ids": list({user for user, _ in keyed}),
            "client_ids": list({client for _, client in keyed}),
        },
    )
    found = {}
    for row in rows.mappings():
        key = (row["author_id"], row["client_id"])
        if key in keyed:
            found[key] = _public_row(row)
    return found


async def _take_seqs(connection: AsyncConnection, counts: Counter[str]) -> dict[str, int]:
    """Reserve `counts[room]` seqs in each room: room id -> the first of them.

    The rooms' rows stay locked until commit. On Postgres, a batch over several rooms locks
    them in id order first, so that two batches (two workers) cannot deadlock."""
    room_ids = sorted(counts)
    if len(room_ids) == 1:
        result = await connection.execute(
            TAKE_SEQS_IN_ONE_ROOM, {"room_id": room_ids[0], "count": counts[room_ids[0]]}
        )
    else:
        if connection.dialect.name == "postgresql":
            await connection.execute(LOCK_ROOMS, {"room_ids": room_ids})
        added = sa.case({room_id: counts[room_id] for room_id in room_ids}, value=ROOMS.c.id)
        result = await connection.execute(
            sa.update(ROOMS)
            .where(ROOMS.c.id.in_(room_ids))
            .values(last_seq=ROOMS.c.last_seq + added)
            .returning(ROOMS.c.id, ROOMS.c.last_seq)
        )
    return {room_id: last_seq - counts[room_id] + 1 for room_id, last_seq in result}


def _public_row(row: Any) -> MessagePublic:
    return MessagePublic(
        id=row["id"],
        room_id=row["room_id"],
        seq=row["seq"],
        change_seq=row["change_seq"],
        author=UserSummary(
            id=row["author_id"], username=row["username"], display_name=row["display_name"]
        ),
        body=row["body"],
        client_id=row["client_id"],
        created_at=row["created_at"],
        edited_at=row["edited_at"],
        deleted=row["deleted"],
    )


async def _next_seq(db: AsyncSession, room_id: str) -> int:
    result = await db.exec(
        update(Room)
        .where(col(Room.id) == room_id)
        .values(last_seq=col(Room.last_seq) + 1)
        .returning(col(Room.last_seq))
    )
    return int(result.scalar_one())


async def _message(db: AsyncSession, room_id: str, seq: int) -> Message:
    message = (
        await db.exec(select(Message).where(col(Message.room_id) == room_id, Message.seq == seq))
    ).first()
    if message is None:
        raise NotFound("Message not found", code="message_not_found")
    return message
