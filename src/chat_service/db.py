"""Database engine, sessions and migrations, for Postgres (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel.ext.asyncio.session import AsyncSession

from alembic import command
from chat_service.settings import Settings

log = logging.getLogger(__name__)

SessionFactory = async_sessionmaker[AsyncSession]
T = TypeVar("T")

# A pooled connection idle longer than this is pinged before it is handed out.
PING_AFTER_IDLE_S = 10.0


def create_engine(settings: Settings) -> AsyncEngine:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        return _sqlite_engine(url, settings)
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_connect_timeout_s,
        connect_args={
            "command_timeout": settings.db_command_timeout_s,
            "timeout": settings.db_connect_timeout_s,
            "server_settings": {"application_name": "chat-service"},
        },
    )
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Hand out no pooled connection that Postgres closed, without a round trip per checkout.

    SQLAlchemy's pool_pre_ping checks every checkout at three round trips (BEGIN, ping,
    ROLLBACK). A restarted or crashed server closes its sockets, which asyncpg notices by
    itself while the connection sits in the pool, so a closed one is simply replaced; only a
    connection idle for a long time (where a silent network failure may have cut it) is
    pinged."""

    @sa.event.listens_for(engine.sync_engine.pool, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @sa.event.listens_for(engine.sync_engine.pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise sa.exc.DisconnectionError("the server closed this pooled connection")
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < PING_AFTER_IDLE_S:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:  # the pool replaces it with a new connection
            raise sa.exc.DisconnectionError("stale pooled connection") from exc


def _make_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not the directories above it (DATA_DIR on a first run)."""
    if not url.startswith("sqlite"):
        return
    database = sa.make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_engine(url: str, settings: Settings) -> AsyncEngine:
    _make_sqlite_directory(url)
    engine = create_async_engine(url, connect_args={"timeout": settings.db_command_timeout_s})

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, open transactions (see _begin_immediate).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(settings.db_command_timeout_s * 1000)}")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _begin_immediate(connection: sa.Connection) -> None:
        # A deferred transaction that reads and then writes fails with SQLITE_BUSY when
        # another writer got in between; taking the write lock up front makes it wait.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def statement_options(db: AsyncSession) -> dict[str, Any]:
    """Execution options for work done in statements that each stand alone: on Postgres,
    autocommit (no BEGIN and COMMIT/ROLLBACK round trips; each statement reads one snapshot
    and commits as it ends). Not on SQLite, whose driver-level transaction setup (below)
    AUTOCOMMIT would undo for good."""
    bind = db.bind
    if bind is not None and bind.dialect.name == "postgresql":
        return {"isolation_level": "AUTOCOMMIT"}
    return {}


class HeldConnection:
    """One pooled connection kept for a stream of small standalone units of work, one at a
    time: the token checks' reads, the send batches.

    A small read through an ORM session on a connection checked out for it costs this
    process 2.5 times the CPU of the same read on a kept connection (bench/statement_micro.py:
    454-736 against 179-232 µs): the session, the checkout and check-in, and setting
    autocommit each time.

    It takes its connection from the engine's pool at its first use and keeps it until
    `close()`, so it counts against the pool size. Work runs in autocommit on Postgres (each
    statement commits as it ends); on SQLite in one transaction, committed when the work
    returns, so no lock or snapshot outlives it. A connection that fails is thrown away, and
    one that Postgres closed meanwhile (a restart: asyncpg notices by itself) is replaced
    before use, as the pool does (`_ping_idle_connections`). Callers must not overlap their
    work (GroupCommit runs one batch at a time)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._connection: AsyncConnection | None = None

    async def all(self, statement: sa.Executable, params: dict[str, Any]) -> Sequence[sa.Row[Any]]:
        """A read's rows; tried once more on a new connection if the server closed the kept
        one just as the read went out (a read is safe to repeat)."""

        async def read(connection: AsyncConnection) -> Sequence[sa.Row[Any]]:
            return (await connection.execute(statement, params)).all()

        try:
            return await self.run(read)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        return await self.run(read)

    async def run(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`work` on the kept connection, never retried (it may have written)."""
        connection = await self._usable()
        try:
            if self._postgres:
                return await work(connection)
            async with connection.begin():
                return await work(connection)
        except BaseException:
            await self._discard()
            raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.invalidate()
            await connection.close()

    async def _usable(self) -> AsyncConnection:
        if self._connection is not None and self._closed_by_server(self._connection):
            await self._discard()
        if self._connection is None:
            self._connection = await self._engine.connect()
            if self._postgres:
                await self._connection.execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    def _closed_by_server(self, connection: AsyncConnection) -> bool:
        return self._postgres and bool(
            connection.sync_connection.connection.driver_connection.is_closed()  # type: ignore[union-attr]
        )


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))


def alembic_config(database_url: str) -> Config:
    """Alembic's config built in code, so migrations run from a wheel as well as a checkout."""
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _migrations_dir() -> Path:
    packaged = Path(__file__).parent / "_alembic"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "alembic"


def migrate(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to `revision`. Blocking: call it outside the event loop."""
    log.info("applying database migrations", extra={"revision": revision})
    _make_sqlite_directory(database_url)
    command.upgrade(alembic_config(database_url), revision)
