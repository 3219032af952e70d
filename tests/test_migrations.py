"""Alembic migrations: a full up/down/up cycle, agreement with the models, contract indexes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

import chat_service.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from alembic import command
from chat_service.db import alembic_config, migrate
from tests.conftest import ephemeral_postgres

APP_TABLES = {table.name for table in SQLModel.metadata.sorted_tables}


@contextlib.asynccontextmanager
async def fresh_database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    async with ephemeral_postgres("migrations") as url:
        yield url


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda conn: sa.inspect(conn).get_table_names()))
    finally:
        await engine.dispose()


async def current_revision(url: str) -> str | None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda conn: MigrationContext.configure(conn).get_current_revision()
            )
    finally:
        await engine.dispose()


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


async def test_upgrade_downgrade_upgrade_on_fresh_database(backend: str, tmp_path: Path) -> None:
    assert {"users", "auth_sessions", "refresh_tokens", "ws_tickets", "messages"} <= APP_TABLES
    async with fresh_database(backend, tmp_path) as url:
        assert not (await table_names(url)) & APP_TABLES

        await asyncio.to_thread(migrate, url)
        assert await table_names(url) >= APP_TABLES
        assert await current_revision(url) == head_revision(url)

        await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
        left = await table_names(url)
        assert not left & APP_TABLES, f"tables left after downgrade to base: {left & APP_TABLES}"
        assert left <= {"alembic_version"}, left
        assert await current_revision(url) is None

        await asyncio.to_thread(migrate, url)
        assert await table_names(url) >= APP_TABLES
        assert await current_revision(url) == head_revision(url)

        # Running it again at head changes nothing and does not fail.
        await asyncio.to_thread(migrate, url)
        assert await current_revision(url) == head_revision(url)


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    def diff(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == [], f"models and migrations differ: {differences}"


def unique_column_sets(connection: sa.Connection, table: str) -> set[tuple[str, ...]]:
    """Column lists (in order) of the table's unique constraints and unique indexes."""
    inspector = sa.inspect(connection)
    found = {tuple(uc["column_names"]) for uc in inspector.get_unique_constraints(table)}
    found |= {
        tuple(str(column) for column in index["column_names"])
        for index in inspector.get_indexes(table)
        if index.get("unique")
    }
    return found


async def test_contract_indexes_exist(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        uniques = await connection.run_sync(unique_column_sets, "messages")
    for columns in [("room_id", "seq"), ("room_id", "change_seq"), ("author_id", "client_id")]:
        assert columns in uniques, f"messages lacks unique {columns}; has {sorted(uniques)}"


async def test_unique_indexes_are_enforced(engine: AsyncEngine, test_database: str) -> None:
    """The constraints act: a second message with the same (room_id, seq) is refused."""
    statements = [
        "INSERT INTO users (id, username, username_key, display_name, password_hash, disabled,"
        " created_at) VALUES ('u1', 'u1', 'u1', 'u1', 'x', false, CURRENT_TIMESTAMP)",
        "INSERT INTO rooms (id, name, description, visibility, owner_id, created_at, last_seq)"
        " VALUES ('r1', 'r', '', 'public', 'u1', CURRENT_TIMESTAMP, 0)",
    ]

    def message(id_: str, seq: int, change_seq: int, client_id: str | None) -> sa.TextClause:
        return sa.text(
            "INSERT INTO messages (id, room_id, seq, change_seq, author_id, body, client_id,"
            " created_at, deleted) VALUES (:id, 'r1', :seq, :change_seq, 'u1', 'b', :client_id,"
            " CURRENT_TIMESTAMP, false)"
        ).bindparams(id=id_, seq=seq, change_seq=change_seq, client_id=client_id)

    async with engine.begin() as connection:
        for statement in statements:
            await connection.execute(sa.text(statement))
        await connection.execute(message("m1", 1, 1, "c1"))
        # NULL client ids never collide.
        await connection.execute(message("m2", 2, 2, None))
        await connection.execute(message("m3", 3, 3, None))

    for clash in (
        message("m4", 1, 4, "c4"),  # same seq
        message("m5", 5, 1, "c5"),  # same change_seq
        message("m6", 6, 6, "c1"),  # same author and client_id
    ):
        try:
            async with engine.begin() as connection:
                await connection.execute(clash)
        except sa.exc.IntegrityError:
            continue
        raise AssertionError(f"duplicate accepted: {clash.compile().params}")
