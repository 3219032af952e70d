"""Micro-benchmark: the CPU one small read costs this process, through each layer.

The token check's read (`domain/accounts.py` `STANDINGS`, one session id) run one after
another against a throwaway database on the local Postgres, through:

- `session`: an ORM session and its connection (autocommit), as the token check read
  before it kept a connection;
- `kept`: `db.HeldConnection`, as the token check reads now;
- `core`: a pooled connection and SQLAlchemy Core's execute;
- `pooled-raw`: a pooled connection, the statement sent with asyncpg's own `fetch`;
- `held-core` / `held-raw`: the same two on a connection held out of the pool;
- `asyncpg`: a plain asyncpg connection, no SQLAlchemy at all;
- `checkout`: a pooled connection taken and given back, no statement;
- `rest`: the whole `GET /api/v1/users/me` around it (the app in this process, called through
  httpx's ASGI transport, so the client's CPU is counted too).

Prints the process CPU time per call (the event loop's own work included, the same in every
row). The layers run in turn, twice, so a change in the machine's speed shows as a
difference between the two passes:

    uv run python bench/statement_micro.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx

from chat_service.app import create_app
from chat_service.db import (
    HeldConnection,
    create_engine,
    create_session_factory,
    migrate,
    statement_options,
)
from chat_service.domain.accounts import STANDINGS
from chat_service.settings import Settings

RAW_STANDINGS = (
    "SELECT s.id, u.id, u.username, u.display_name, u.created_at, u.disabled"
    " FROM users u JOIN auth_sessions s ON s.user_id = u.id"
    " WHERE s.id = ANY($1::text[]) AND s.revoked_at IS NULL"
)


@contextlib.asynccontextmanager
async def scratch_database(server: str) -> AsyncIterator[str]:
    name = f"statement_micro_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{server.rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def per_call_us(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(calls // 10):  # warm: prepared statements, pool, caches
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def run(server: str, calls: int) -> None:
    async with scratch_database(server) as url:
        settings = Settings(database_url=url.replace("postgresql://", "postgresql+asyncpg://"))
        await asyncio.to_thread(migrate, settings.resolved_database_url)
        plain = await asyncpg.connect(url)
        await plain.execute(
            "INSERT INTO users (id, username, username_key, display_name, password_hash,"
            " created_at, disabled) VALUES ('u1', 'u1', 'u1', 'u1', 'x', now(), false);"
            "INSERT INTO auth_sessions (id, user_id, created_at) VALUES ('s1', 'u1', now())"
        )
        engine = create_engine(settings)
        sessions = create_session_factory(engine)
        params = {"session_ids": ["s1"]}

        async def session() -> object:
            async with sessions() as db:
                connection = await db.connection(execution_options=statement_options(db))
                return (await connection.execute(STANDINGS, params)).all()

        async def core() -> object:
            async with engine.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                return (await connection.execute(STANDINGS, params)).all()

        async def pooled_raw() -> object:
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                return await raw.driver_connection.fetch(RAW_STANDINGS, ["s1"])

        async def checkout() -> object:
            async with engine.connect() as connection:
                return connection

        kept = HeldConnection(engine)
        held = await engine.connect()
        await held.execution_options(isolation_level="AUTOCOMMIT")
        held_driver = (await held.get_raw_connection()).driver_connection

        async def held_core() -> object:
            return (await held.execute(STANDINGS, params)).all()

        app = create_app(settings.model_copy(update={"jwt_secret": uuid.uuid4().hex * 2}))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        signup = {"username": "micro", "password": "correct horse battery staple"}
        token = (await client.post("/api/v1/auth/signup", json=signup)).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}

        layers: dict[str, Callable[[], Awaitable[object]]] = {
            "session": session,
            "kept": lambda: kept.all(STANDINGS, params),
            "core": core,
            "pooled-raw": pooled_raw,
            "held-core": held_core,
            "held-raw": lambda: held_driver.fetch(RAW_STANDINGS, ["s1"]),
            "asyncpg": lambda: plain.fetch(RAW_STANDINGS, ["s1"]),
            "checkout": checkout,
            "rest": lambda: client.get("/api/v1/users/me", headers=bearer),
        }
        try:
            for number in (1, 2):
                for name, call in layers.items():
                    figure = await per_call_us(call, calls)
                    print(f"pass {number}  {name:<11} {figure:6.0f} µs CPU per call")  # noqa: T201
        finally:
            await client.aclose()
            await lifespan.__aexit__(None, None, None)
            await held.close()
            await kept.close()
            await engine.dispose()
            await plain.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop  # the server's loop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run(args.server, args.calls))


if __name__ == "__main__":
    main()
