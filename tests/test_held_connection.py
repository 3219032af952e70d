"""The connection kept for token checks and send batches (`db.HeldConnection`): many reads on
one checkout, each read seeing what was committed before it (no snapshot or lock kept between
reads, on either backend), work committed as it returns, a dropped or cancelled connection
replaced without failing the next use, and the connection given back on close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chat_service.db import HeldConnection, create_engine
from chat_service.models import User
from chat_service.settings import Settings
from tests.conftest import ephemeral_postgres

USER_COUNT = sa.select(sa.func.count()).select_from(User.__table__)  # type: ignore[arg-type]
BACKEND_PID = sa.text("SELECT pg_backend_pid()")
INSERT_USER = sa.text(
    "INSERT INTO users (id, username, username_key, display_name, password_hash, created_at,"
    " disabled) VALUES (:id, :id, :id, :id, 'x', CURRENT_TIMESTAMP, false)"
)


@pytest.fixture
async def service_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The suite's database through the service's own engine (SQLite's write locks included)."""
    engine = create_engine(settings.model_copy(update={"db_command_timeout_s": 2.0}))
    yield engine
    await engine.dispose()


async def test_reads_share_one_checkout_and_each_sees_the_latest_commit(
    service_engine: AsyncEngine,
) -> None:
    pool = service_engine.sync_engine.pool
    checkouts: list[object] = []
    sa.event.listen(pool, "checkout", lambda *args: checkouts.append(args))
    held = HeldConnection(service_engine)
    try:
        for n in range(5):
            assert (await held.all(USER_COUNT, {}))[0][0] == n
            # A write between reads: it would wait on a lock (SQLite) and the next read would
            # see an old snapshot if a read left its transaction open.
            async with service_engine.begin() as writer:
                await writer.execute(INSERT_USER, {"id": f"user{n}"})
        assert (await held.all(USER_COUNT, {}))[0][0] == 5
        # One checkout for the held connection, one per write.
        assert len(checkouts) == 1 + 5
        assert pool.checkedout() == 1  # type: ignore[attr-defined]
    finally:
        await held.close()
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_read_raises_and_the_next_read_gets_a_working_connection(
    service_engine: AsyncEngine,
) -> None:
    held = HeldConnection(service_engine)
    try:
        await held.all(USER_COUNT, {})
        with pytest.raises(sa.exc.DBAPIError):
            await held.all(sa.text("SELECT * FROM no_such_table"), {})
        assert (await held.all(USER_COUNT, {}))[0][0] == 0
        assert service_engine.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    finally:
        await held.close()


async def test_work_is_committed_when_it_returns_and_a_failure_keeps_no_transaction_open(
    service_engine: AsyncEngine,
) -> None:
    held = HeldConnection(service_engine)

    async def insert_then_fail(connection: AsyncConnection) -> None:
        await connection.execute(INSERT_USER, {"id": "second"})
        raise RuntimeError("the work failed after a statement")

    try:
        await held.run(lambda connection: connection.execute(INSERT_USER, {"id": "first"}))
        with pytest.raises(RuntimeError):
            await held.run(insert_then_fail)
        await held.run(lambda connection: connection.execute(INSERT_USER, {"id": "third"}))
    finally:
        await held.close()
    async with service_engine.connect() as other:
        ids = set((await other.execute(sa.text("SELECT id FROM users"))).scalars())
    # Postgres runs in autocommit: each statement committed as it ended. SQLite: the failed
    # work's transaction was rolled back with it.
    postgres = service_engine.dialect.name == "postgresql"
    assert ids == ({"first", "second", "third"} if postgres else {"first", "third"})


# --- Postgres going away under a kept connection (its own database: backend independent) ------


@pytest.fixture
async def postgres_engine() -> AsyncIterator[AsyncEngine]:
    async with ephemeral_postgres("held") as url:
        engine = create_async_engine(url)
        yield engine
        await engine.dispose()


async def _terminate(engine: AsyncEngine, pid: int) -> None:
    async with engine.connect() as admin:
        await admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


@pytest.mark.backend_independent
async def test_a_connection_the_server_dropped_is_replaced_and_the_read_still_answers(
    postgres_engine: AsyncEngine,
) -> None:
    held = HeldConnection(postgres_engine)
    try:
        first = (await held.all(BACKEND_PID, {}))[0][0]
        assert (await held.all(BACKEND_PID, {}))[0][0] == first  # kept
        await _terminate(postgres_engine, first)
        await asyncio.sleep(0.2)  # the backend's exit reaches the socket
        second = (await held.all(BACKEND_PID, {}))[0][0]
        assert second != first
        assert (await held.all(BACKEND_PID, {}))[0][0] == second
        assert postgres_engine.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    finally:
        await held.close()


@pytest.mark.backend_independent
async def test_a_read_cancelled_mid_statement_does_not_leave_the_connection_busy(
    postgres_engine: AsyncEngine,
) -> None:
    held = HeldConnection(postgres_engine)
    try:
        first = (await held.all(BACKEND_PID, {}))[0][0]
        slow = asyncio.create_task(held.all(sa.text("SELECT pg_sleep(30)"), {}))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        second = await asyncio.wait_for(held.all(BACKEND_PID, {}), 5)
        assert second[0][0] != first
    finally:
        await held.close()
