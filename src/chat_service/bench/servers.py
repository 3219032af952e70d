"""Servers the bench starts itself: chat-service, the two baselines, a private Redis, and a
fresh Postgres database for the run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa

from chat_service.bench.proc import pin_tree

log = logging.getLogger(__name__)

BENCH_DB_PREFIX = "chat_bench_"
# bench/baselines/ of a checkout: src/chat_service/bench/servers.py -> the repository root.
DEFAULT_BASELINES = Path(__file__).resolve().parents[3] / "bench" / "baselines"
BASELINE_SCRIPTS = {"tutorial": "tutorial.py", "raw": "raw_ws.py"}
CHAT_SERVICE = "chat-service"
TARGET_KINDS = (CHAT_SERVICE, *BASELINE_SCRIPTS)
SOURCE_SEPARATOR = "@"  # chat-service@LABEL: chat-service run from other sources
IMPORTED_FROM = "chat_service imported from"
ALL_CPUS = os.sched_getaffinity(0)  # at import, before the generator pins itself

# The settings a load test needs: the defaults protect a real deployment from one client
# (10 signups per hour per IP, 10 messages/s per user) and would refuse the generator.
BENCH_SERVER_ENV = {
    "ENVIRONMENT": "dev",
    "AUTO_MIGRATE": "false",
    "LOG_LEVEL": "WARNING",
    "LOG_FORMAT": "console",
    "SIGNUP_IP_LIMIT": "1000000/hour",
    "LOGIN_IP_LIMIT": "1000000/minute",
    "LOGIN_ACCOUNT_LIMIT": "1000000/minute",
    "MESSAGE_RATE_PER_S": "1000000",
    "MESSAGE_BURST": "1000000",
    "ACCESS_TOKEN_TTL_S": "7200",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process the bench started."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    pinned: set[int] | None = None
    started: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pin(self, cpus: set[int] | None) -> None:
        if cpus:
            pin_tree(self.pid, cpus)
            self.pinned = cpus

    def logs(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


async def start_server(
    name: str,
    command: list[str],
    *,
    port: int,
    env: Mapping[str, str],
    workdir: Path,
    timeout_s: float = 60.0,
) -> Server:
    """Start `command` and wait until it accepts TCP connections on `port`."""
    server = _spawn(name, command, port=port, env=env, workdir=workdir)
    process = server.process
    started = asyncio.get_running_loop().time()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited at start (code {process.returncode}):\n{server.logs()}"
            )
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            took = asyncio.get_running_loop().time() - started
            log.info("started %s (pid %d, port %d) in %.1f s", name, process.pid, port, took)
            return server
        if asyncio.get_running_loop().time() > deadline:
            await stop_server(server)
            raise RuntimeError(
                f"{name} did not listen on {port} in {timeout_s} s:\n{server.logs()}"
            )
        await asyncio.sleep(0.1)


def _spawn(
    name: str, command: list[str], *, port: int, env: Mapping[str, str], workdir: Path
) -> Server:
    """Popen returns at once; the output goes to a log file in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}-{port}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own command line, no shell
            command,
            cwd=workdir,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_server kills workers too
        )
    # A child inherits the generator's CPU pinning: free it (it is pinned once set up).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(process.pid, ALL_CPUS)
    return Server(name, port, process, log_path)


async def stop_server(server: Server, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL for the whole process group if it does not go in time."""
    process = server.process
    started = asyncio.get_running_loop().time()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        for _ in range(int(timeout_s * 10)):
            if process.poll() is not None:
                break
            await asyncio.sleep(0.1)
    if process.poll() is None:
        log.warning("%s did not stop in %.0f s: killing it", server.name, timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # workers and stragglers of its session too
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
    took = asyncio.get_running_loop().time() - started
    log.info("stopped %s in %.1f s", server.name, took)


# `python -m chat_service` that first logs where the package was imported from, so a run
# of other sources (--source) can prove from the server process itself which code it ran.
_LAUNCHER = (
    "import runpy, sys, chat_service; "
    f"print({IMPORTED_FROM!r}, chat_service.__file__, file=sys.stderr, flush=True); "
    "runpy.run_module('chat_service', run_name='__main__', alter_sys=True)"
)


def chat_service_command(port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-c",
        _LAUNCHER,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def imported_from(server: Server) -> Path | None:
    """The chat_service package the server runs, from the line its launcher logged (the
    last one: a log file of the same name and port from an earlier run is appended to)."""
    for line in reversed(server.log_path.read_text(errors="replace").splitlines()):
        if line.startswith(IMPORTED_FROM):
            return Path(line.removeprefix(IMPORTED_FROM).strip()).parent
    return None


def source_path(source: Path, env: Mapping[str, str]) -> str:
    """PYTHONPATH that puts `source`/src ahead of the venv's own chat_service."""
    path = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return os.pathsep.join(p for p in (str(source / "src"), path) if p)


def baseline_command(kind: str, port: int, baselines: Path) -> list[str]:
    script = baselines / BASELINE_SCRIPTS[kind]
    if not script.is_file():
        raise FileNotFoundError(
            f"baseline {kind!r} not found at {script}: run the bench from a checkout of "
            "chat-service, or give --baselines DIR"
        )
    return [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port)]


def redis_command(port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]


# --- the bench database --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_database(admin_url: str, *, keep: bool = False) -> AsyncIterator[str]:
    """A new database on the admin URL's server, migrated to head; dropped at the end."""
    url = sa.make_url(admin_url)
    name = f"{BENCH_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    admin = await _connect(url)
    try:
        await _drop_orphans(admin)
        await admin.execute(f'CREATE DATABASE "{name}"')
        log.info("created the bench database %s", name)
        database_url = url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
        try:
            from chat_service.db import migrate

            await asyncio.to_thread(migrate, database_url)
            yield database_url
        finally:
            if keep:
                log.warning("keeping the bench database %s", name)
            else:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                log.info("dropped the bench database %s", name)
    finally:
        await admin.close()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def _connect(url: sa.URL) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database or "postgres",
        timeout=10,
    )


async def connect_database(database_url: str) -> asyncpg.Connection:
    return await _connect(sa.make_url(database_url))


async def _drop_orphans(admin: asyncpg.Connection) -> None:
    """Drop bench databases left by runs that were killed before they could clean up."""
    rows = await admin.fetch(
        "SELECT datname FROM pg_database WHERE datname LIKE $1", BENCH_DB_PREFIX + "%"
    )
    for row in rows:
        pid = row["datname"][len(BENCH_DB_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')


# --- a private Postgres cluster (--private-postgres) ---------------------------------------


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb: install PostgreSQL")
    return found[-1].parent


def _initdb(root: Path) -> tuple[Path, str | None]:
    """A new cluster in `root`; as user `postgres` when we are root (postgres refuses root)."""
    user = "postgres" if os.geteuid() == 0 else None
    data = root / "data"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    subprocess.run(  # noqa: S603 - fixed command
        [
            str(_pg_bin() / "initdb"),
            *("-D", str(data), "--auth=trust", "-U", "postgres"),
            *("--no-locale", "-E", "UTF8", "--no-sync"),
        ],
        check=True,
        capture_output=True,
        user=user,
        group=user,
        cwd=root,
    )
    return data, user


def _start_postgres(root: Path, data: Path, user: str | None, port: int) -> subprocess.Popen[bytes]:
    command = [
        str(_pg_bin() / "postgres"),
        *("-D", str(data), "-p", str(port), "-k", str(root)),
        *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"),
        *("-c", "max_connections=300", "-c", "shared_buffers=128MB"),
    ]
    with (root / "postgres.log").open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - fixed command
            command, stdout=log_file, stderr=subprocess.STDOUT, user=user, group=user, cwd=root
        )
    with contextlib.suppress(OSError):
        os.sched_setaffinity(process.pid, ALL_CPUS)
    return process


@contextlib.asynccontextmanager
async def private_postgres(workdir: Path) -> AsyncIterator[tuple[str, int]]:
    """A throwaway cluster on a free port (fsync on, like the machine's): its admin URL and
    the postmaster's pid.

    Other test runs on the machine's Postgres create and drop databases all the time, and
    each CREATE DATABASE forces a checkpoint that stalls every commit on that server; a
    private cluster keeps those stalls out of the figures (the CPU is still shared)."""
    root = Path(tempfile.mkdtemp(prefix="chat-bench-pg-", dir="/tmp"))
    port = free_port()
    try:
        data, user = await asyncio.to_thread(_initdb, root)
        process = _start_postgres(root, data, user, port)
        try:
            for _ in range(600):
                if process.poll() is not None:
                    raise RuntimeError(f"private postgres exited: see {root}/postgres.log")
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # listening comes a moment before accepting logins
            log.info("private postgres on port %d (%s)", port, root)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres", process.pid
        finally:
            process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), 30)
            except TimeoutError:
                process.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
