"""Alembic environment: async engines, and an existing connection when one is handed in."""

import asyncio
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import chat_service.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from alembic import context
from chat_service.settings import Settings

config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url


def _render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | bool:
    """Write plain SQLAlchemy types into migrations, not SQLModel's or our decorators."""
    if kind != "type":
        return False
    if isinstance(item, sa.TypeDecorator):
        item = item.impl
    if isinstance(item, sa.String) and not isinstance(item, sa.Text):
        return f"sa.String(length={item.length})"
    if isinstance(item, sa.DateTime):
        return f"sa.DateTime(timezone={item.timezone})"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    asyncio.run(_run_async())
