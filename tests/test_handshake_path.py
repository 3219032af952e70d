"""The WebSocket handshake's fast path: the one-statement principal read (still read at every
handshake: revocation and disabling act at once; storage failures still close 1013; concurrent
checks share a statement), and the lighter queue and event of our uvicorn protocol."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chat_service.clock import utcnow
from chat_service.db import HeldConnection
from chat_service.domain.accounts import _padded
from chat_service.errors import Unauthorized
from chat_service.server import Flag, Inbox
from tests.conftest import LiveServer
from tests.helpers import API, free_port
from tests.test_ws_protocol import Harness

# --- the principal, read at every handshake ------------------------------------------------------


@pytest.fixture
async def h(live: LiveServer) -> AsyncIterator[Harness]:
    async with httpx.AsyncClient(base_url=live.http, timeout=30) as http:
        harness = Harness(live, http)
        try:
            yield harness
        finally:
            with contextlib.suppress(Exception):
                await harness.close_all()


async def test_a_revocation_refuses_the_very_next_handshake_with_the_same_token(h: Harness) -> None:
    alice = await h.signup("alice")
    first = await h.connect(alice)  # the token was good a moment ago
    response = await h.http.post(
        f"{API}/auth/logout", json={"refresh_token": alice.refresh_token}, headers=alice.headers
    )
    assert response.status_code == 204, response.text
    again = await h.open(headers=alice.headers)
    assert await again.expect_close(4401) == []
    assert again.close_reason == "session_revoked"
    await first.expect_close(4401)  # and the open one is closed


async def test_disabling_refuses_the_very_next_handshake_and_rest_call(
    h: Harness, engine: AsyncEngine
) -> None:
    alice = await h.signup("alice")
    await h.connect(alice)
    assert (await h.http.get(f"{API}/users/me", headers=alice.headers)).status_code == 200
    async with engine.begin() as db:
        await db.execute(
            sa.text("UPDATE users SET disabled = :yes WHERE id = :id"),
            {"yes": True, "id": alice.id},
        )
    again = await h.open(headers=alice.headers)
    assert await again.expect_close(4403) == []
    assert again.close_reason == "account_disabled"
    response = await h.http.get(f"{API}/users/me", headers=alice.headers)
    assert response.status_code == 403, response.text


async def test_a_storage_failure_in_the_handshake_closes_1013_and_rest_answers_503(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await h.signup("alice")
    accounts = h.server.app.state.accounts
    # The accounts' token reads pointed at a database that cannot be reached (of the same kind).
    if h.server.app.state.engine.dialect.name == "sqlite":
        url = "sqlite+aiosqlite:////nonexistent-directory/chat.db"
    else:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    unreachable = create_async_engine(url)
    monkeypatch.setattr(accounts, "_token_reads", HeldConnection(unreachable))
    try:
        client = await h.open(headers=alice.headers)
        assert await client.expect_close(1013) == []
        assert h.hub.stats()["connections"] == 0
        response = await h.http.get(f"{API}/users/me", headers=alice.headers)
        assert response.status_code == 503, response.text
    finally:
        monkeypatch.undo()
        await unreachable.dispose()
    await h.connect(alice)  # back once storage is


async def test_the_principal_holds_plain_values(h: Harness) -> None:
    alice = await h.signup("alice")
    principal = await h.server.app.state.accounts.authenticate(alice.token)
    assert principal.user.summary().model_dump() == alice.summary
    assert not hasattr(principal.user, "__dict__")  # slots: no ORM state per socket


async def test_concurrent_token_checks_share_a_statement_and_each_gets_its_own_answer(
    h: Harness,
) -> None:
    alice, bob, carol = [await h.signup(name) for name in ("alice", "bob", "carol")]
    accounts = h.server.app.state.accounts
    codec = accounts._codec
    response = await h.http.post(
        f"{API}/auth/logout", json={"refresh_token": carol.refresh_token}, headers=carol.headers
    )
    assert response.status_code == 204, response.text
    # Signed, but naming bob's session for alice: the session must be its subject's.
    bobs_session = codec.decode(bob.token).session_id
    crossed, _ = codec.encode(alice.id, bobs_session, utcnow())
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "auth_sessions" in statement:
            statements.append(statement)

    engine = h.server.app.state.engine.sync_engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        tokens = [alice.token, bob.token, crossed, carol.token] * 10
        answers = await asyncio.gather(
            *(accounts.authenticate(token) for token in tokens), return_exceptions=True
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    for answer, expected in zip(answers, [alice.id, bob.id, None, None] * 10, strict=True):
        if expected is None:
            assert isinstance(answer, Unauthorized), answer
            assert answer.code == "session_revoked"
        else:
            assert not isinstance(answer, BaseException), answer
            assert answer.user.id == expected
    assert 1 <= len(statements) <= 2, statements  # 40 checks, not 40 statements


def test_a_batch_of_session_ids_is_padded_to_a_power_of_two() -> None:
    assert _padded(["a"]) == ["a"]
    assert _padded(["a", "b", "c"]) == ["a", "b", "c", "c"]
    assert len(_padded([str(i) for i in range(33)])) == 64
    assert len(_padded([str(i) for i in range(64)])) == 64


# --- the protocol's queue and event ---------------------------------------------------------------


async def test_inbox_is_fifo_and_wakes_a_waiting_getter() -> None:
    inbox = Inbox()
    assert inbox.empty()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert await asyncio.wait_for(getter, 1) == "a"
    assert not inbox.empty()
    assert await inbox.get() == "b"
    assert inbox.empty()


async def test_inbox_passes_an_item_on_when_its_getter_is_cancelled() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("x")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "x"
    assert first.cancelled()


async def test_flag_waits_until_set_and_clears() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    flag.set()
    assert await asyncio.wait_for(waiter, 1) is True
    assert await flag.wait() is True  # set: returns at once
    flag.clear()
    cancelled = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    flag.set()  # nobody left to wake: no error
    assert flag.is_set()
