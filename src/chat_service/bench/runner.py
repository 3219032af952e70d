"""The targets of one bench invocation: starting, pinning and stopping them, and the bench
database they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx

import chat_service
from chat_service.bench import profile
from chat_service.bench.accounts import Population, Protocol
from chat_service.bench.proc import CpuMeter, pin_self, raise_file_limit
from chat_service.bench.servers import (
    BENCH_SERVER_ENV,
    CHAT_SERVICE,
    DEFAULT_BASELINES,
    SOURCE_SEPARATOR,
    Server,
    baseline_command,
    bench_database,
    chat_service_command,
    connect_database,
    free_port,
    imported_from,
    private_postgres,
    source_path,
    start_server,
    stop_server,
)

log = logging.getLogger(__name__)

DEFAULT_ADMIN_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Options:
    """What every scenario shares (the common command-line options)."""

    out: Path
    rounds: int = 2
    targets: tuple[str, ...] = (CHAT_SERVICE, "tutorial", "raw")
    url: str | None = None
    protocol: Protocol = "chat"
    server_pid: int | None = None
    admin_database_url: str = DEFAULT_ADMIN_DATABASE_URL
    database_url: str | None = None  # the external target's database (history scenario)
    server_cpus: set[int] | None = field(default_factory=lambda: {0})
    generator_cpus: set[int] | None = field(default_factory=lambda: {1})
    keep_database: bool = False
    baselines: Path = DEFAULT_BASELINES
    server_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
    private_postgres: bool = False
    py_spy: str = "py-spy"
    # --source LABEL=DIR: chat-service run from DIR/src too, as target chat-service@LABEL.
    sources: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetSpec:
    """A target to run: a kind the bench starts (or the external URL), and its label."""

    name: str
    kind: str  # chat-service, tutorial, raw, or "external"
    workers: int = 1
    env: tuple[tuple[str, str], ...] = ()
    pinned: bool = True
    source: Path | None = None  # a checkout whose src/ the server runs instead of ours

    @property
    def protocol(self) -> Protocol:
        return "chat" if self.kind == CHAT_SERVICE else "baseline"


@dataclass
class Live:
    """A running target."""

    spec: TargetSpec
    protocol: Protocol
    host: str
    port: int
    pid: int | None
    server: Server | None
    server_cpus: set[int] | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def meter(self) -> CpuMeter:
        return CpuMeter(self.pid)

    def pin(self) -> None:
        """Pin the server once its setup (signups, joins) is done."""
        if self.server is not None and self.spec.pinned:
            self.server.pin(self.server_cpus)


class Bench:
    """One invocation: options, the bench database (made on first need), populations."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.jwt_secret = secrets.token_urlsafe(48)
        self.populations: dict[str, Population] = {}
        self.profiles: list[tuple[str, str, profile.Profile]] = []  # scenario, title, profile
        # Processes the bench started besides the targets (private Postgres, Redis): their
        # CPU is measured too, since on two cores it is taken from the server or generator.
        self.infra_pids: dict[str, int] = {}
        self._stack = contextlib.AsyncExitStack()
        self._database_url: str | None = None
        self._source_label: str | None = None  # see from_source()

    async def __aenter__(self) -> Bench:
        self.options.out.mkdir(parents=True, exist_ok=True)
        raise_file_limit()
        if self.options.generator_cpus:
            pin_self(self.options.generator_cpus)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def database_url(self) -> str:
        """The external target's database, or a fresh migrated one for the bench's servers."""
        if self.options.url is not None:
            if self.options.database_url is None:
                raise SystemExit("this scenario needs --database-url of the target's database")
            return self.options.database_url
        if self._database_url is None:
            admin_url = self.options.admin_database_url
            if self.options.private_postgres:
                admin_url, pid = await self._stack.enter_async_context(
                    private_postgres(self.options.out)
                )
                self.infra_pids["postgres"] = pid
            self._database_url = await self._stack.enter_async_context(
                bench_database(admin_url, keep=self.options.keep_database)
            )
        return self._database_url

    async def refresh_statistics(self) -> None:
        """ANALYZE the database the bench made, as autovacuum would in time. A statement a
        server prepared while a table was empty keeps its plan (a sequential scan of it) until
        its statistics change: without this, whichever target runs first is measured with
        plans made for empty tables (about 1.5x Postgres's CPU per send in ingest)."""
        if self._database_url is None:
            return  # the baselines store nothing; an external target's database is not ours
        connection = await connect_database(self._database_url)
        try:
            await connection.execute("ANALYZE")
        finally:
            await connection.close()
        log.info("analyzed the bench database")

    def infra_meters(self) -> dict[str, CpuMeter]:
        return {name: CpuMeter(pid) for name, pid in self.infra_pids.items()}

    def specs(self, kinds: tuple[str, ...] | None = None) -> list[TargetSpec]:
        """The targets to alternate: the external URL alone, or the chosen kinds."""
        if self.options.url is not None:
            return [TargetSpec(name=self.options.url, kind="external", pinned=False)]
        wanted = kinds if kinds is not None else self.options.targets
        return [self._spec(name) for name in wanted]

    def _spec(self, name: str) -> TargetSpec:
        kind, _, label = name.partition(SOURCE_SEPARATOR)
        if not label:
            return TargetSpec(name=name, kind=kind)
        return TargetSpec(name=name, kind=kind, source=self.options.sources[label])

    def chat_service_variants(self) -> list[str | None]:
        """Our code (None), then the label of each --source."""
        return [None, *self.options.sources]

    @contextlib.contextmanager
    def from_source(self, label: str | None) -> Iterator[None]:
        """One round in which every chat-service the scenario starts runs the sources of
        --source `label` (None: ours), named NAME@LABEL: how the scenarios that keep their
        own targets (history, login-storm, workers) compare sources, round by round."""
        saved = self.options
        self.options = replace(saved, rounds=1)
        self._source_label = label
        try:
            yield
        finally:
            self.options = saved
            self._source_label = None

    def _with_source(self, spec: TargetSpec) -> TargetSpec:
        label = self._source_label
        if label is None or spec.kind != CHAT_SERVICE or spec.source is not None:
            return spec
        name = f"{spec.name}{SOURCE_SEPARATOR}{label}"
        return replace(spec, name=name, source=self.options.sources[label])

    def population(self, live: Live) -> Population:
        """chat-service runs share one database, so their users and rooms are made once."""
        if live.server is None:
            key = live.base_url
        elif live.protocol == "chat":
            key = "chat-service:bench-database"
        else:
            key = live.spec.kind
        if key not in self.populations:
            self.populations[key] = Population(live.protocol, live.base_url)
        population = self.populations[key]
        population.base_url = live.base_url
        return population

    @contextlib.asynccontextmanager
    async def profiling(self, live: Live, label: str) -> AsyncIterator[None]:
        """With --profile: py-spy samples the chat-service server while the block runs."""
        if not self.options.profile or live.pid is None or live.protocol != "chat":
            yield
            return
        path = self.options.out / "profiles" / f"{label}-{live.name}-{len(self.profiles)}.txt"
        async with profile.record(self.options.py_spy, live.pid, path):
            yield
        summary = profile.summarize(path)
        if summary is not None:
            self.profiles.append((label, f"{label}, {live.name}", summary))

    @contextlib.asynccontextmanager
    async def launch(self, spec: TargetSpec, **extra_env: str) -> AsyncIterator[Live]:
        """Start the target (unpinned: setup may use both cores), yield it, stop it."""
        options = self.options
        if spec.kind == "external":
            assert options.url is not None
            parts = urlsplit(options.url)
            yield Live(
                spec,
                options.protocol,
                parts.hostname or "127.0.0.1",
                parts.port or 80,
                options.server_pid,
                None,
                None,
            )
            return
        spec = self._with_source(spec)
        port = free_port()
        workdir = options.out / "servers"
        if spec.kind == CHAT_SERVICE:
            env = {
                **BENCH_SERVER_ENV,
                "DATABASE_URL": await self.database_url(),
                "JWT_SECRET": self.jwt_secret,
                "DATA_DIR": str((workdir / "data").resolve()),
                "BROKER_URL": "memory://",
                **dict(spec.env),
                **options.server_env,
                **extra_env,
            }
            if spec.source is not None:
                env["PYTHONPATH"] = source_path(spec.source, env)
            command = chat_service_command(port, spec.workers)
        else:
            env = dict(options.server_env)
            command = baseline_command(spec.kind, port, options.baselines)
        server = await start_server(spec.name, command, port=port, env=env, workdir=workdir)
        cpus = options.server_cpus if spec.pinned else None
        try:
            if spec.kind == CHAT_SERVICE:
                _check_source(spec, server)
                await _wait_healthy(f"http://127.0.0.1:{port}")
            yield Live(spec, spec.protocol, "127.0.0.1", port, server.pid, server, cpus)
        finally:
            await stop_server(server)


def _check_source(spec: TargetSpec, server: Server) -> None:
    """The server runs the code it was meant to: --source's, or ours."""
    package = imported_from(server)
    log.info("%s runs chat_service from %s", spec.name, package)
    ours = Path(chat_service.__file__).parent
    wanted = (spec.source / "src" / "chat_service" if spec.source else ours).resolve()
    if package is None or package.resolve() != wanted:
        raise RuntimeError(f"{spec.name} runs chat_service from {package}, not {wanted}")


async def _wait_healthy(base_url: str, timeout_s: float = 60.0) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        for _ in range(int(timeout_s * 10)):
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base_url} did not become ready in {timeout_s} s")
