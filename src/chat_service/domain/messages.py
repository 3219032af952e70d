"""Messages: send (idempotent by client_id), edit, delete, read cursors.

Every change in a room takes the next seq from `rooms.last_seq` in the transaction that writes
it. The UPDATE that takes it locks the room's row until commit, so changes in one room commit
one after another in seq order, and "everything after seq N" never skips a change.

Sends are group-committed (domain/group_commit.py): the sends that arrive while a transaction
is in flight are checked, numbered and stored together in the next one, rooms locked in id
order (domain/send_batch.py: two statements on Postgres, whatever the batch holds). Each
still gets its own answer, and an ack still means its transaction committed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property

from limits import RateLimitItemPerSecond
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.clock import utcnow
from chat_service.db import HeldConnection, SessionFactory
from chat_service.domain import send_batch
from chat_service.domain.access import OWNER, RoomNotFound, room_access
from chat_service.domain.events import Event, EventSink, EventType
from chat_service.domain.group_commit import GroupCommit
from chat_service.domain.history import MessageFields, message_public
from chat_service.errors import Conflict, Forbidden, InvalidInput, NotFound
from chat_service.models import Membership, Message, Room, User
from chat_service.ratelimit import RateLimiter, Rule
from chat_service.schemas import MessagePublic
from chat_service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sent:
    fields: MessageFields  # what the ack and the event carry: no model built per send
    created: bool  # False: this client_id was sent before and `fields` are the original's

    @classmethod
    def of(cls, message: MessagePublic, *, created: bool) -> Sent:
        return cls(message.model_dump(), created)

    @cached_property
    def message(self) -> MessagePublic:
        return MessagePublic.model_validate(self.fields)


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
# Users whose sends a batch counts against the rate limit at once, when the counters are
# shared (Redis): each count is a round trip, awaited with the batch's transaction open.
RATE_COUNT_LANES = 8


class MessageService:
    def __init__(
        self,
        sessions: SessionFactory,
        batch_writes: HeldConnection,
        events: EventSink,
        limiter: RateLimiter,
        settings: Settings,
    ) -> None:
        self._sessions = sessions
        self._batch_writes = batch_writes
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
        # A caller that goes away (its socket closed) does not cancel the others' batch.
        return await asyncio.shield(self.enqueue(user_id, room_id, body, client_id, on_stored))

    def enqueue(
        self,
        user_id: str,
        room_id: str,
        body: str,
        client_id: str | None = None,
        on_stored: Callable[[Sent], None] | None = None,
    ) -> asyncio.Future[Sent]:
        """`send` without waiting for the commit (a socket's next frames need not wait):
        the future settles when it is done; a caller's sends are stored in the order queued."""
        self._check_body(body)
        return self._batches.enqueue(Draft(user_id, room_id, body, client_id, on_stored))

    async def _store(self, drafts: list[Draft]) -> list[Sent | BaseException]:
        """One batch of sends (send_batch.py says how it meets the database); each gets its
        message or its error."""
        outcomes: list[_Pending] = [None] * len(drafts)

        async def store(
            connection: AsyncConnection,
        ) -> tuple[send_batch.Facts, list[int], send_batch.Stored]:
            facts = await send_batch.read_facts(connection, drafts)
            fresh = await self._fresh_drafts(drafts, facts, outcomes)
            stored = await send_batch.insert(connection, [drafts[i] for i in fresh], utcnow())
            return facts, fresh, stored

        try:
            facts, fresh, stored = await self._batch_writes.run(store)
        except IntegrityError:
            # A client_id committed concurrently by another transaction (another worker):
            # one at a time, the way that sorts it out. (Fresh drafts pay their rate budget
            # twice here; this is rare.)
            log.info("a batch met a concurrent client_id; storing its sends one by one")
            results = [await self._send_alone(draft) for draft in drafts]
        else:
            for place in stored.vanished:
                outcomes[fresh[place]] = RoomNotFound()
            kept = [index for place, index in enumerate(fresh) if place not in stored.vanished]
            for index, row in zip(kept, stored.rows, strict=True):
                author = facts.authors[(row["room_id"], row["author_id"])]
                outcomes[index] = Sent(send_batch.message_fields(row, author), created=True)
            results = [_resolve(outcomes, index) for index in range(len(drafts))]
        for draft, result in zip(drafts, results, strict=True):
            if isinstance(result, Sent):
                if draft.on_stored is not None:
                    draft.on_stored(result)
                if result.created:
                    self._announce("message.new", result.fields)
        return results

    async def _fresh_drafts(
        self, drafts: list[Draft], facts: send_batch.Facts, outcomes: list[_Pending]
    ) -> list[int]:
        """Settle the drafts that store nothing (no access, a resend, over the rate limit)
        in `outcomes`; return the indexes of those to store. Only resends are free: sends
        refused for access count against the rate limit too (each costs queries).

        Each user's drafts are settled in order; different users' may be counted at once
        (everything here is per user: the rate limit's key and the client_ids)."""
        by_user: dict[str, list[int]] = {}
        for index, draft in enumerate(drafts):
            by_user.setdefault(draft.user_id, []).append(index)
        first_of: dict[tuple[str, str], int] = {}
        fresh: list[int] = []

        async def settle(indexes: list[int]) -> None:
            for index in indexes:
                draft = drafts[index]
                key = (draft.user_id, draft.client_id) if draft.client_id is not None else None
                allowed_in = index not in facts.denied
                if allowed_in and key is not None and key in facts.originals:
                    outcomes[index] = _resend(facts.originals[key], draft.room_id)
                elif allowed_in and key is not None and key in first_of:
                    outcomes[index] = _Same(first_of[key])  # sent twice in one batch
                elif not await self._limiter.allow(self._rate, draft.user_id):
                    outcomes[index] = await self._limiter.refusal(self._rate, draft.user_id)
                elif not allowed_in:
                    outcomes[index] = facts.denied[index]
                else:
                    if key is not None:
                        first_of[key] = index
                    fresh.append(index)

        lanes = RATE_COUNT_LANES if self._limiter.shared else 1
        await _in_lanes(settle, list(by_user.values()), lanes)
        return sorted(fresh)

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
                    return Sent.of(original, created=False)  # a resend costs no rate budget
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
                return Sent.of(original, created=False)
            public = message_public(message, author)
        return Sent.of(public, created=True)

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
        self._announce("message.updated", public.model_dump())
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
        self._announce("message.deleted", public.model_dump())

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

    def _announce(self, event_type: EventType, message: MessageFields) -> None:
        self._events.publish(Event(event_type, {"message": message}, room_id=message["room_id"]))


def _resolve(outcomes: list[_Pending], index: int) -> Sent | BaseException:
    outcome = outcomes[index]
    if isinstance(outcome, _Same):
        first = _resolve(outcomes, outcome.index)
        return Sent(first.fields, created=False) if isinstance(first, Sent) else first
    assert outcome is not None
    return outcome


def _resend(original: MessageFields, room_id: str) -> Sent | BaseException:
    if original["room_id"] != room_id:
        return Conflict(
            "This client_id was already used for a message in another room",
            code="client_id_reused",
        )
    return Sent(original, created=False)  # a resend costs no rate budget


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


async def _in_lanes(
    work: Callable[[list[int]], Awaitable[None]], items: list[list[int]], lanes: int
) -> None:
    """`work` on every item, at most `lanes` at a time (each lane takes the next item)."""
    waiting = iter(items)

    async def lane() -> None:
        for item in waiting:
            await work(item)

    if lanes == 1:
        await lane()
        return
    tasks = [asyncio.create_task(lane()) for _ in range(min(lanes, len(items)))]
    try:
        await asyncio.gather(*tasks)  # the first error as it was raised
    except BaseException:
        for task in tasks:  # one lane failing stops the others
            task.cancel()
        raise
