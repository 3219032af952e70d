"""Test harness: an ephemeral, migrated database per run, clean tables per test.

Postgres by default (TEST_DATABASE_URL names the server); `--db sqlite` or TEST_DB=sqlite runs
the same suite on a SQLite file. The database is dropped at the end, even after failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

from chat_service.app import create_app
from chat_service.db import migrate
from chat_service.server import uvicorn_options
from chat_service.settings import Settings
from tests.helpers import TEST_JWT_SECRET, ServerProcess, free_port

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_DB_PREFIX = "chat_test_"
HOW_TO_START_POSTGRES = (
    "Start one with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(Debian), `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`, "
    "or point TEST_DATABASE_URL at another server. To test on SQLite instead: "
    "`uv run pytest --db sqlite`."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=("postgres", "sqlite"),
        default=os.environ.get("TEST_DB", "postgres"),
        help="database backend for the suite (default: postgres; env TEST_DB)",
    )
    parser.addoption(
        "--split",
        action="store_true",
        help="run backend_independent tests only in the suite their marker names (CI)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --split (CI runs the PostgreSQL and SQLite suites side by side), a test marked
    backend_independent runs only in the suite its marker names: on the other backend it
    would repeat the same work for nothing. They are deselected there, not skipped; without
    --split every test runs."""
    if not config.getoption("--split"):
        return
    backend = config.getoption("--db")
    elsewhere = [item for item in items if _independent_suite(item) not in (None, backend)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]


def _independent_suite(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("backend_independent")
    return None if marker is None else str(marker.kwargs.get("suite", "postgres"))


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> str:
    return str(pytestconfig.getoption("--db"))


@pytest.fixture(scope="session")
async def database_url(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A new database, migrated to head by Alembic, dropped when the run ends."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'chat.db'}"
        await asyncio.to_thread(migrate, url)
        yield url
        return
    async with ephemeral_postgres("suite") as url:
        await asyncio.to_thread(migrate, url)
        yield url


@contextlib.asynccontextmanager
async def ephemeral_postgres(purpose: str) -> AsyncIterator[str]:
    """Create a uniquely named database on the test server; drop it on exit, whatever happened."""
    server_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_SERVER_URL)
    url = sa.make_url(server_url)
    name = f"{TEST_DB_PREFIX}{os.getpid()}_{purpose}_{secrets.token_hex(4)}"
    admin = await _admin_connection(url)
    try:
        await _drop_orphans(admin)
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
                hide_password=False
            )
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _admin_connection(url: sa.URL) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=url.database or "postgres",
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.exit(
            f"No PostgreSQL server reachable at {url.render_as_string()} ({exc}). "
            + HOW_TO_START_POSTGRES,
            returncode=3,
        )


async def _drop_orphans(admin: asyncpg.Connection) -> None:
    """Drop test databases left by runs that were killed before they could clean up."""
    rows = await admin.fetch(
        "SELECT datname FROM pg_database WHERE datname LIKE $1", TEST_DB_PREFIX + "%"
    )
    for row in rows:
        pid = row["datname"][len(TEST_DB_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def test_database(database_url: str, engine: AsyncEngine) -> AsyncIterator[str]:
    """The suite's database for one test, emptied after it (every DB fixture goes through here)."""
    yield database_url
    tables = [table.name for table in reversed(SQLModel.metadata.sorted_tables)]
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        else:
            for table in tables:
                await connection.execute(sa.text(f"DELETE FROM {table}"))


@pytest.fixture
def settings_factory(test_database: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": test_database,
            "jwt_secret": TEST_JWT_SECRET,
            "data_dir": tmp_path / "data",
            "auto_migrate": False,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


AppFactory = Callable[..., Awaitable[FastAPI]]


@pytest.fixture
async def app_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[AppFactory]:
    """Build apps (lifespan started) with setting overrides; all are shut down after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> FastAPI:
            app = create_app(settings_factory(**overrides))
            await stack.enter_async_context(app.router.lifespan_context(app))
            return app

        yield make


@pytest.fixture
async def app(app_factory: AppFactory) -> FastAPI:
    return await app_factory()


def client_for(app: FastAPI, ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


@pytest.fixture
def server_env(test_database: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a real `chat-service serve` process on the test database."""
    return {
        "DATABASE_URL": test_database,
        "JWT_SECRET": TEST_JWT_SECRET,
        "AUTO_MIGRATE": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "DATA_DIR": str(tmp_path / "data"),
    }


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    """A real uvicorn process (`chat-service serve`) on a free port."""
    process = ServerProcess(env=server_env, port=free_port(), workdir=tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


class LiveServer:
    """A real uvicorn server on a real port, in this process: sockets are real, and the test
    can still look inside the app (its hub, its tasks)."""

    def __init__(self, app: FastAPI, server: uvicorn.Server, port: int) -> None:
        self.app = app
        self.server = server
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"


LiveServerFactory = Callable[..., Awaitable[LiveServer]]


@pytest.fixture
async def live_server_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[LiveServerFactory]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> LiveServer:
        settings = settings_factory(**overrides)
        app = create_app(settings)
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(settings))
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.01)
        return LiveServer(app, server, port)

    yield start
    for server, task in reversed(servers):  # signal handlers unwind in LIFO order
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def live(live_server_factory: LiveServerFactory) -> LiveServer:
    return await live_server_factory()
