"""The send batch's two database steps (domain/send_batch.py), on each backend's own SQL:
what is known about each draft, and numbering and storing the fresh ones."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chat_service.clock import utcnow
from chat_service.db import create_session_factory, statement_options
from chat_service.domain import send_batch
from chat_service.domain.access import NotMember, RoomNotFound
from chat_service.models import Membership, Message, Room, User


@dataclass(frozen=True)
class Draft:
    user_id: str
    room_id: str
    body: str = "hi"
    client_id: str | None = None


@dataclass(frozen=True)
class World:
    alice: str
    bob: str
    public: str
    private: str


@pytest.fixture
async def world(engine: AsyncEngine, test_database: str) -> World:
    async with create_session_factory(engine)() as db:
        alice = User(
            username="alice", username_key="alice", display_name="Alice", password_hash="x"
        )
        bob = User(username="bob", username_key="bob", display_name="Bob", password_hash="x")
        db.add_all([alice, bob])
        await db.flush()
        public = Room(name="public", owner_id=alice.id, visibility="public", last_seq=3)
        private = Room(name="private", owner_id=alice.id, visibility="private")
        db.add_all([public, private])
        await db.flush()
        db.add_all([Membership(room_id=room.id, user_id=alice.id) for room in (public, private)])
        db.add(
            Message(
                room_id=public.id,
                seq=3,
                change_seq=3,
                author_id=alice.id,
                body="earlier",
                client_id="c1",
            )
        )
        await db.commit()
        return World(alice.id, bob.id, public.id, private.id)


async def test_facts_tell_members_outsiders_and_resends_apart(
    engine: AsyncEngine, world: World
) -> None:
    drafts = [
        Draft(world.alice, world.public, client_id="c1"),  # a resend
        Draft(world.alice, world.private),
        Draft(world.bob, world.public),  # public, not a member: join first
        Draft(world.bob, world.private),  # private, not a member: does not exist for bob
        Draft(world.alice, "no-such-room"),
        Draft(world.alice, world.private, client_id="c1"),  # c1 was used in another room
    ]
    async with create_session_factory(engine)() as db:
        connection = await db.connection(execution_options=statement_options(db))
        facts = await send_batch.read_facts(connection, drafts)

    assert sorted(facts.authors) == sorted(
        [(world.public, world.alice), (world.private, world.alice)]
    )
    assert facts.authors[(world.public, world.alice)]["display_name"] == "Alice"
    assert {i: type(error) for i, error in facts.denied.items()} == {
        2: NotMember,
        3: RoomNotFound,
        4: RoomNotFound,
    }
    original = facts.originals[(world.alice, "c1")]
    assert (original["room_id"], original["seq"], original["body"]) == (world.public, 3, "earlier")
    assert original["author"]["username"] == "alice"
    assert original["created_at"].utcoffset() is not None, "timestamps come back zone-aware"


async def test_insert_numbers_each_room_in_draft_order_and_skips_a_vanished_room(
    engine: AsyncEngine, world: World
) -> None:
    drafts = [
        Draft(world.alice, world.public, "p1", "x1"),
        Draft(world.alice, world.private, "q1"),
        Draft(world.alice, world.public, "p2"),
        Draft(world.alice, "deleted-meanwhile", "lost"),
        Draft(world.alice, world.private, "q2", "x2"),
    ]
    async with create_session_factory(engine)() as db:
        connection = await db.connection(execution_options=statement_options(db))
        stored = await send_batch.insert(connection, drafts, utcnow())
        await db.commit()

    assert stored.vanished == [3]
    assert [(row["body"], row["seq"], row["change_seq"]) for row in stored.rows] == [
        ("p1", 4, 4),
        ("q1", 1, 1),
        ("p2", 5, 5),
        ("q2", 2, 2),
    ]
    async with engine.connect() as connection:
        in_db = (
            await connection.execute(
                sa.text(
                    "SELECT id, room_id, seq, body, client_id FROM messages WHERE seq <> 3 "
                    "OR body <> 'earlier' ORDER BY body"
                )
            )
        ).all()
        last_seqs = dict(
            (await connection.execute(sa.text("SELECT id, last_seq FROM rooms"))).all()
        )
    assert [tuple(row) for row in in_db] == sorted(
        [(r["id"], r["room_id"], r["seq"], r["body"], r["client_id"]) for r in stored.rows],
        key=lambda row: row[3],
    ), "stored as answered, and nothing for the vanished room"
    assert last_seqs == {world.public: 5, world.private: 2}
