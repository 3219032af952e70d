"""A private PostgreSQL cluster for fault tests, and a TCP proxy that can black-hole it.

The machine's Postgres on :5432 serves every other test run and must never be stopped or
slowed. Fault tests instead run their own cluster: `initdb` into a temporary directory, then
`postgres -D <dir> -p <free port>` as a child process that the test may stop (fast or
immediate shutdown), kill with SIGKILL and start again on the same port and data directory.

PostgreSQL refuses to run as root: when the tests run as root, the cluster's directory belongs
to the `postgres` user and its programs run as that user. The binaries are found with a glob
over /usr/lib/postgresql/*/bin (Debian's layout), or in PG_BIN_DIR when that is set.

`PausableProxy` sits between the service and a cluster and, while paused, reads but forwards
nothing (new connections are accepted but never answered): a database that hangs rather than
refuses, which only the service's own timeouts can get it out of.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pytest

from chat_service.db import migrate
from tests.helpers import free_port

DIR_PREFIX = "chat-pg-"
PG_USER = "postgres"
TEMPLATE_DB = "chat_template"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
StopMode = Literal["smart", "fast", "immediate"]
# What each shutdown mode is, as a signal to the postmaster (see the pg_ctl docs).
STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


def pg_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory; a missing install fails loudly."""
    configured = os.environ.get("PG_BIN_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda path: _version_key(path.parent.name),
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin: "
        "install the postgresql package or set PG_BIN_DIR"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _as_root() -> bool:
    return os.geteuid() == 0


def _run_as() -> str | None:
    """The cluster's programs run as `postgres` when we are root (they refuse root)."""
    return PG_USER if _as_root() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (the command name may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_of(pid: int) -> dict[int, str]:
    """The postmaster's backends and helpers: pid -> start time (which tells a process from a
    later one that got the same pid)."""
    children = {}
    for entry in glob.glob("/proc/[0-9]*"):
        child = int(Path(entry).name)
        fields = _stat(child)
        if fields is not None and int(fields[1]) == pid:
            children[child] = fields[19]
    return children


def _still_running(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


class PrivatePostgres:
    """One throwaway cluster in its own temporary directory, on its own port."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = pg_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir="/tmp"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    # --- life ----------------------------------------------------------------------------------

    def init(self) -> None:
        """initdb (trust authentication, user `postgres`)."""
        self.socket_dir.mkdir()
        if _as_root():
            entry = pwd.getpwnam(PG_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bin / "initdb"),
            *("-D", str(self.data_dir), "--auth=trust", "-U", PG_USER),
            *("--no-locale", "-E", "UTF8", "--no-sync"),
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the postmaster on this cluster's port and wait until it takes connections."""
        assert not self.running, "already running"
        command = [
            str(self.bin / "postgres"),
            *("-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.socket_dir)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"),
            *("-c", "max_connections=200", "-c", "shared_buffers=32MB"),
        ]
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    user=_run_as(),
                    group=_run_as(),
                )
            if self._wait_ready(deadline):
                return
            # After a SIGKILL the old backends may still hold the shared memory for a moment,
            # and the new postmaster refuses to start next to them: try again.
            if self.process.poll() is None or time.monotonic() >= deadline:
                self._kill_postmaster()
                raise RuntimeError(f"postgres did not start on :{self.port}:\n{self.logs()}")
            time.sleep(0.2)

    def stop(self, mode: StopMode = "fast", timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut down in `mode` ("immediate" is a crash for the data: recovery runs at start)."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(STOP_SIGNALS[mode])
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise RuntimeError(f"postgres ignored a {mode} shutdown for {timeout} s") from None

    def kill9(self) -> None:
        """SIGKILL the postmaster alone, as a crash would; its orphaned backends notice and
        exit, and are waited for (or killed) so that the next start() finds the memory free."""
        if not self.running:
            return
        assert self.process is not None
        orphans = _children_of(self.process.pid)
        self._kill_postmaster()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (alive := [pid for pid, t in orphans.items() if _still_running(pid, t)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        for pid in alive:  # still there after the deadline: the cluster's own, by pid and age
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop (immediately) and delete everything."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- databases -----------------------------------------------------------------------------

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        """A plain URL (the service picks asyncpg itself); `port` goes through a proxy."""
        return f"postgresql://{PG_USER}@127.0.0.1:{port or self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql; return its unaligned output."""
        return self._run(
            str(self.bin / "psql"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", database),
            *("-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", statement),
        )

    def migrated_template(self) -> None:
        """The `chat_template` database at Alembic's head, copied by create_database()."""
        self.sql(f'CREATE DATABASE "{TEMPLATE_DB}"')
        url = self.url(TEMPLATE_DB).replace("postgresql://", "postgresql+asyncpg://", 1)
        # Alembic runs its own event loop: on a thread of its own, so that this works from
        # inside a running loop too.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(migrate, url).result()

    def create_database(self, name: str) -> str:
        """A new database with the service's schema (copied from the template): its URL."""
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- internals -----------------------------------------------------------------------------

    def _run(self, *command: str) -> str:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=120,
            user=_run_as(),
            group=_run_as(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr}")
        return str(result.stdout)

    def _wait_ready(self, deadline: float) -> bool:
        """pg_isready until it answers "accepting connections"; False if postgres exited."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def _kill_postmaster(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()


def sweep_orphans() -> None:
    """Remove clusters left by test runs that died before their cleanup (their postmaster is
    shut down by its data directory, not by a process name)."""
    for root in glob.glob(f"/tmp/{DIR_PREFIX}*"):
        owner = Path(root).name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        lock = Path(root) / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(lock.read_text().splitlines()[0])
            if str(Path(root) / "data") in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGQUIT)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivatePostgres]:
    """A started cluster with the migrated template database; deleted on exit."""
    sweep_orphans()
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        cluster.migrated_template()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module", name="private_postgres")
def private_postgres_fixture() -> Iterator[PrivatePostgres]:
    """One cluster per test module (initdb is the slow part). A test that stops it must
    leave it running again, or take `pg_database`, which restarts it after the test."""
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture(name="pg_database")
def pg_database_fixture(private_postgres: PrivatePostgres) -> Iterator[str]:
    """A fresh migrated database on the private cluster for one test: its plain URL. The
    cluster is running again after the test, whatever the test did to it."""
    if not private_postgres.running:
        private_postgres.start()
    name = f"chat_{os.getpid()}_{int(time.monotonic() * 1000)}"
    url = private_postgres.create_database(name)
    try:
        yield url
    finally:
        if not private_postgres.running:
            private_postgres.start()
        private_postgres.drop_database(name)


# --- a proxy that can hang -------------------------------------------------------------------


class PausableProxy:
    """A TCP proxy on its own thread and event loop (so a test blocking its own loop never
    stalls it). While paused it forwards nothing in either direction and opens no upstream
    connection: to the service, the database hangs."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.connections = 0

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def pause(self) -> None:
        self._call(self._set_open(False))

    def resume(self) -> None:
        self._call(self._set_open(True))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _set_open(self, value: bool) -> None:
        if value:
            self._open.set()
        else:
            self._open.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()  # the database refuses: so does the proxy
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        clean = False
        try:
            while data := await source.read(65536):
                await self._open.wait()
                sink.write(data)
                await sink.drain()
            clean = True
        except OSError:
            pass  # a reset on one side is passed on to the other as a reset
        finally:
            self._writers.discard(sink)
            if clean:
                sink.close()  # after what is still buffered: a closed socket, not a lost tail
            else:
                sink.transport.abort()
