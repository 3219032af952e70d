"""Where a batch of sends meets the database: what is known about each draft, then the fresh
drafts numbered and stored.

Postgres: two statements on an autocommit connection, whatever the batch holds. One reads,
per draft, its room, membership, author and any message already sent under its client_id;
one takes the seqs and inserts, rooms locked in id order, and commits as it ends (a single
statement is its own transaction, so "ack means committed" and "one room's changes commit in
seq order" hold as before). No BEGIN/COMMIT round trips and no SQL compiled per call.
Reading outside the writing transaction decides nothing differently: under READ COMMITTED
the membership read never held a lock either.

SQLite: the portable Core statements below, in the caller's transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel

from chat_service.domain.access import PUBLIC, NotMember, RoomNotFound
from chat_service.domain.history import MessageFields
from chat_service.errors import DomainError
from chat_service.ids import new_id

# UserSummary's fields, plain (MessageFields' author).
AuthorFields = dict[str, str]


class DraftLike(Protocol):
    """What this module reads from a draft (domain/messages.py `Draft`)."""

    @property
    def user_id(self) -> str: ...
    @property
    def room_id(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...


@dataclass(frozen=True)
class Facts:
    authors: dict[tuple[str, str], AuthorFields]  # (room id, user id) -> author, members only
    denied: dict[int, DomainError]  # draft index -> why its author may not post there
    originals: dict[tuple[str, str], MessageFields]  # (user id, client_id) -> sent before


@dataclass(frozen=True)
class Stored:
    rows: list[dict[str, Any]]  # the messages as inserted, in the order of the drafts
    vanished: list[int]  # drafts whose room was deleted after the facts were read


async def read_facts(connection: AsyncConnection, drafts: Sequence[DraftLike]) -> Facts:
    if connection.dialect.name == "postgresql":
        return await _read_facts_postgres(connection, drafts)
    return await _read_facts_portable(connection, drafts)


async def insert(connection: AsyncConnection, drafts: Sequence[DraftLike], now: datetime) -> Stored:
    """Number the drafts room by room (in their order) and store them."""
    if not drafts:
        return Stored([], [])
    counts: Counter[str] = Counter()
    places: list[int] = []  # each draft's place among its room's drafts, from 0
    for draft in drafts:
        places.append(counts[draft.room_id])
        counts[draft.room_id] += 1
    ids = [new_id() for _ in drafts]
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        first_seq = await _take_and_insert_postgres(connection, drafts, ids, places, counts, now)
    else:
        first_seq = await _take_seqs_portable(connection, counts)
    rows: list[dict[str, Any]] = []
    vanished: list[int] = []
    for index, draft in enumerate(drafts):
        if draft.room_id in first_seq:
            seq = first_seq[draft.room_id] + places[index]
            rows.append(_row(ids[index], draft, seq, now))
        else:
            vanished.append(index)
    if not postgres and rows:
        await connection.execute(INSERT_MESSAGES, rows)
    return Stored(rows, vanished)


def _row(message_id: str, draft: DraftLike, seq: int, now: datetime) -> dict[str, Any]:
    return {
        "id": message_id,
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


def _denial(visibility: str | None) -> DomainError:
    """What `room_access` answers a non-member: a public room says join first; a private or
    missing one does not admit it exists."""
    return NotMember() if visibility == PUBLIC else RoomNotFound()


def _author(user_id: str, username: str, display_name: str) -> AuthorFields:
    return {"id": user_id, "username": username, "display_name": display_name}


def message_fields(row: Any, author: AuthorFields) -> MessageFields:
    """A stored message (a row or `_row`'s dict) with its author, as MessageFields."""
    return {
        "id": row["id"],
        "room_id": row["room_id"],
        "seq": row["seq"],
        "change_seq": row["change_seq"],
        "author": author,
        "body": row["body"],
        "client_id": row["client_id"],
        "created_at": row["created_at"],
        "edited_at": row["edited_at"],
        "deleted": row["deleted"],
    }


# --- Postgres -------------------------------------------------------------------------------

# One row per draft, in draft order (ordinality i, from 1).
READ_FACTS = """
SELECT d.i, r.visibility, m.user_id IS NOT NULL AS member, u.username, u.display_name,
       o.id, o.room_id, o.seq, o.change_seq, o.body, o.client_id,
       o.created_at, o.edited_at, o.deleted
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[])
     WITH ORDINALITY AS d(user_id, room_id, client_id, i)
LEFT JOIN rooms r ON r.id = d.room_id
LEFT JOIN memberships m ON m.room_id = d.room_id AND m.user_id = d.user_id
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN messages o ON o.author_id = d.user_id AND o.client_id = d.client_id
ORDER BY d.i
"""

# Rooms locked in id order (so two batches cannot deadlock), their seqs taken, the drafts
# inserted with theirs; answers each room's last seq before this batch. A room deleted
# since the read has no row here, and its drafts are not inserted.
TAKE_AND_INSERT = """
WITH locked AS (
    SELECT id FROM rooms WHERE id = ANY($1::varchar[]) ORDER BY id FOR UPDATE
), taken AS (
    UPDATE rooms SET last_seq = rooms.last_seq + c.n
    FROM locked JOIN unnest($1::varchar[], $2::bigint[]) AS c(room_id, n)
         ON c.room_id = locked.id
    WHERE rooms.id = locked.id
    RETURNING rooms.id, rooms.last_seq - c.n AS before
), stored AS (
    INSERT INTO messages
        (id, room_id, seq, change_seq, author_id, body, client_id, created_at, edited_at,
         deleted)
    SELECT d.id, d.room_id, t.before + 1 + d.place, t.before + 1 + d.place, d.author_id,
           d.body, d.client_id, $9::timestamptz, NULL, false
    FROM unnest($3::varchar[], $4::varchar[], $5::bigint[], $6::varchar[], $7::text[],
                $8::varchar[]) AS d(id, room_id, place, author_id, body, client_id)
    JOIN taken t ON t.id = d.room_id
)
SELECT id, before FROM taken
"""


async def _read_facts_postgres(connection: AsyncConnection, drafts: Sequence[DraftLike]) -> Facts:
    result = await connection.exec_driver_sql(
        READ_FACTS,
        (
            [d.user_id for d in drafts],
            [d.room_id for d in drafts],
            [d.client_id for d in drafts],
        ),
    )
    facts = Facts({}, {}, {})
    for row in result.mappings():
        index = row["i"] - 1
        draft = drafts[index]
        author = _author(draft.user_id, row["username"], row["display_name"])
        if row["member"]:
            facts.authors[(draft.room_id, draft.user_id)] = author
        else:
            facts.denied[index] = _denial(row["visibility"])
        if row["id"] is not None and draft.client_id is not None:
            facts.originals[(draft.user_id, draft.client_id)] = message_fields(row, author)
    return facts


async def _take_and_insert_postgres(
    connection: AsyncConnection,
    drafts: Sequence[DraftLike],
    ids: list[str],
    places: list[int],
    counts: Counter[str],
    now: datetime,
) -> dict[str, int]:
    """Room id -> the first seq its drafts got (rooms that vanished are missing)."""
    room_ids = sorted(counts)
    result = await connection.exec_driver_sql(
        TAKE_AND_INSERT,
        (
            room_ids,
            [counts[room_id] for room_id in room_ids],
            ids,
            [d.room_id for d in drafts],
            places,
            [d.user_id for d in drafts],
            [d.body for d in drafts],
            [d.client_id for d in drafts],
            now,
        ),
    )
    return {row.id: row.before + 1 for row in result}


# --- SQLite (and any other dialect): portable Core statements --------------------------------

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
TAKE_SEQS = (
    sa.update(ROOMS)
    .where(ROOMS.c.id == sa.bindparam("room_id"))
    .values(last_seq=ROOMS.c.last_seq + sa.bindparam("count"))
    .returning(ROOMS.c.last_seq)
)
INSERT_MESSAGES = sa.insert(MESSAGES)


async def _read_facts_portable(connection: AsyncConnection, drafts: Sequence[DraftLike]) -> Facts:
    members = await connection.execute(
        SELECT_MEMBER_AUTHORS,
        {
            "room_ids": list({d.room_id for d in drafts}),
            "user_ids": list({d.user_id for d in drafts}),
        },
    )
    authors = {
        (room_id, user_id): _author(user_id, username, name)
        for room_id, user_id, username, name in members
    }
    outsiders = {
        index: draft
        for index, draft in enumerate(drafts)
        if (draft.room_id, draft.user_id) not in authors
    }
    denied: dict[int, DomainError] = {}
    if outsiders:
        rooms = list({d.room_id for d in outsiders.values()})
        visibility = dict((await connection.execute(SELECT_VISIBILITY, {"room_ids": rooms})).all())
        denied = {i: _denial(visibility.get(d.room_id)) for i, d in outsiders.items()}
    return Facts(authors, denied, await _originals_portable(connection, drafts))


async def _originals_portable(
    connection: AsyncConnection, drafts: Sequence[DraftLike]
) -> dict[tuple[str, str], MessageFields]:
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
            author = _author(row["author_id"], row["username"], row["display_name"])
            found[key] = message_fields(row, author)
    return found


async def _take_seqs_portable(connection: AsyncConnection, counts: Counter[str]) -> dict[str, int]:
    """SQLite has one writer at a time (BEGIN IMMEDIATE, db.py): no lock order to keep."""
    first_seq = {}
    for room_id in sorted(counts):
        result = await connection.execute(TAKE_SEQS, {"room_id": room_id, "count": counts[room_id]})
        last_seq = result.scalar_one_or_none()
        if last_seq is not None:
            first_seq[room_id] = last_seq - counts[room_id] + 1
    return first_seq
