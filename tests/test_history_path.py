"""The history read path: REST pages and the snapshot of a WebSocket join, read below the ORM.

The `joined` frame is written from plain values, each message encoded once. These tests hold
it to the documented frame byte for byte and to the stored rows, keep the reply within the
outbound queue's byte budget, and keep a repeat join to two reads and no write.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.domain.history import message_public
from chat_service.models import Message, User
from chat_service.realtime import frames
from tests.conftest import LiveServerFactory
from tests.helpers import API, signup
from tests.test_ws_protocol import Client, Harness, HarnessFactory, seqs
from tests.test_ws_protocol import User as Account

QUEUE_BYTES = 64 * 1024  # the smallest outbound queue the settings allow
EURO = "\u20ac"  # three bytes in UTF-8


@pytest.fixture
async def harness_factory(
    live_server_factory: LiveServerFactory,
) -> AsyncIterator[HarnessFactory]:
    """`make(**settings)`: a live server with those settings, an HTTP client for it, and
    every socket opened through it closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Harness:
            server = await live_server_factory(**overrides)
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.http, timeout=30)
            )
            harness = Harness(server, http)
            stack.push_async_callback(harness.close_all)
            return harness

        yield make


@pytest.fixture
async def h(harness_factory: HarnessFactory) -> Harness:
    return await harness_factory()


async def signup_as(h: Harness, username: str, display_name: str) -> Account:
    body = await signup(h.http, username, display_name=display_name)
    user = body["user"]
    return Account(
        id=user["id"],
        username=user["username"],
        token=body["access_token"],
        refresh_token=body["refresh_token"],
        summary={k: user[k] for k in ("id", "username", "display_name")},
    )


async def raw_joined(client: Client, frame: dict[str, Any]) -> str:
    """The `joined` reply to `frame`, as the text the server sent."""
    await client.send(frame)
    while True:
        raw = await client.ws.recv()
        assert isinstance(raw, str)
        if json.loads(raw)["type"] == "joined":
            return raw
        assert json.loads(raw)["type"] == "presence", raw


async def stored(engine: AsyncEngine, room: str) -> dict[int, dict[str, Any]]:
    """seq -> the message as the ORM reads it and MessagePublic writes it."""
    async with AsyncSession(engine) as db:
        rows = await db.exec(
            select(Message, User)
            .join(User, col(User.id) == Message.author_id)
            .where(col(Message.room_id) == room)
        )
        return {m.seq: message_public(m, u).model_dump(mode="json") for m, u in rows}


async def test_joined_frame_is_the_documented_encoding_byte_for_byte(
    h: Harness, engine: AsyncEngine
) -> None:
    alice = await signup_as(h, "alice", "Alice A.")
    bob = await signup_as(h, "bob", "Bob \u00e9")
    room = await h.room(alice)
    await h.post(alice, room, 'caf\u00e9 \U0001f600 "quoted" \\ back\nslash <b>', client_id="c-1")
    assert (await h.http.post(f"{API}/rooms/{room}/join", headers=bob.headers)).status_code == 200
    await h.post(bob, room, "from bob")
    await h.post(alice, room, "to edit")
    await h.post(alice, room, "to delete")
    response = await h.http.patch(
        f"{API}/rooms/{room}/messages/3", json={"body": "edited"}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    response = await h.http.delete(f"{API}/rooms/{room}/messages/4", headers=alice.headers)
    assert response.status_code == 204, response.text
    async with engine.begin() as db:  # a timestamp without microseconds is written shorter
        await db.execute(
            sa.update(Message)
            .where(col(Message.room_id) == room, col(Message.seq) == 2)
            .values(created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        )
    expected = await stored(engine, room)

    b = await h.connect(bob)
    await h.join(b, room)  # bob online: `online` has someone else in it
    a = await h.connect(alice)
    for frame, want in (
        ({"type": "join", "room_id": room, "ref": "with-ref"}, [1, 2, 3, 4]),
        ({"type": "join", "room_id": room, "ref": 7, "limit": 2}, [3, 4]),
        ({"type": "join", "room_id": room}, [1, 2, 3, 4]),
        ({"type": "join", "room_id": room, "since_seq": 1}, [2, 3, 4]),  # changes 2, 5, 6
    ):
        raw = await raw_joined(a, frame)
        assert frames.Joined.model_validate_json(raw).encode() == raw.encode()
        joined = json.loads(raw)
        assert ("ref" in joined) == ("ref" in frame)
        assert joined["messages"] == [expected[seq] for seq in want]
        assert (joined["last_seq"], joined["truncated"]) == (6, False)
        assert {u["id"] for u in joined["online"]} == {alice.id, bob.id}
    page = await h.history(alice, room)
    assert page == [expected[seq] for seq in (1, 2, 3, 4)]
    assert expected[2]["created_at"] == "2026-01-02T03:04:05Z"


async def test_joined_fits_half_the_outbound_queue_in_utf8_bytes(
    harness_factory: HarnessFactory,
) -> None:
    """Counted in characters, 26 of these messages would "fit" half the queue and make a
    frame of 84 KB, over the whole queue: the connection would be closed 4408 instead."""
    h = await harness_factory(
        outbound_queue_bytes=QUEUE_BYTES, message_rate_per_s=1000, message_burst=1000
    )
    alice = await h.signup("alice")
    room = await h.room(alice)
    for n in range(1, 41):
        await h.post(alice, room, f"{n:02} " + EURO * 1000)
    a = await h.connect(alice)
    for frame, first in (({"limit": 40}, False), ({"since_seq": 0}, True)):
        raw = await raw_joined(a, {"type": "join", "room_id": room, **frame})
        assert len(raw.encode()) <= QUEUE_BYTES // 2 + 1024, len(raw.encode())
        joined = json.loads(raw)
        assert joined["truncated"] is True
        got = seqs(joined["messages"])
        assert 5 <= len(got) < 40
        assert got == (list(range(1, len(got) + 1)) if first else list(range(41 - len(got), 41)))
    await a.ping()


@contextlib.contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL statements `engine` runs meanwhile (SQLite's BEGIN IMMEDIATE left out)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.startswith("BEGIN"):
            seen.append(statement.split(None, 1)[0].upper())

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)


async def test_a_first_join_makes_a_member_and_a_repeat_join_only_reads_twice(
    h: Harness,
) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    await h.post(alice, room, "hello")
    b = await h.connect(bob)
    engine: AsyncEngine = h.server.app.state.engine
    with statements(engine) as first:
        joined = await h.join(b, room)
    assert "INSERT" in first
    assert seqs(joined["messages"]) == [1]
    with statements(engine) as again:
        joined = await h.join(b, room, since_seq=0)
    assert again == ["SELECT", "SELECT"]  # membership, then access and history in one
    assert seqs(joined["messages"]) == [1]
    assert (await h.get_room(bob, room)).json()["role"] == "member"


async def test_empty_pages_still_check_access(h: Harness) -> None:
    alice, eve = await h.signup("alice"), await h.signup("eve")
    public, private = await h.room(alice), await h.room(alice, visibility="private")
    a = await h.connect(alice)
    joined = await h.join(a, public)
    assert (joined["messages"], joined["last_seq"], joined["truncated"]) == ([], 0, False)
    for params in ({}, {"before_seq": 1}, {"after_seq": 0}):
        assert await h.history(alice, public, **params) == []
        for room, status, code in ((public, 403, "not_member"), (private, 404, "room_not_found")):
            response = await h.http.get(
                f"{API}/rooms/{room}/messages", params=params, headers=eve.headers
            )
            assert (response.status_code, response.json()["code"]) == (status, code)
