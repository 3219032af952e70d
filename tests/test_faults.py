"""Faults (issue 8, item 4): real `chat-service serve` processes against a private PostgreSQL
cluster (tests/pg_private.py) that the tests stop, crash, black-hole and start again.

1. A cold start with Postgres and Redis down: the process stays up, /readyz 503, REST 503
   `unavailable`, handshakes closed 1013; once Postgres is there, the degraded mode of
   docs/scaling.md (stored, acked, delivered locally; /readyz 503 for the broker); once Redis
   is there too, ready. (tests/test_scale_out.py covers Redis restarting under two processes.)
2. Postgres restarted (fast shutdown) and crashed (immediate shutdown, SIGKILL of the
   postmaster) under WebSocket traffic: no ack without a commit, `unavailable` (not acks, not
   `internal`, not hangs) while it is down, the first requests after a restart succeed,
   resuming with since_seq misses nothing.
3. A database that hangs (a paused proxy): the DB timeouts fire; 503, `unavailable`, 1013.
4. SIGTERM under load: 1012 for every socket, every ack stored, exit 0 within the grace
   period; then a reconnect storm: 200 sockets resume at once from the restarted server.

The machine's Postgres and Redis are never touched: every store that is stopped is our own.
Each test's server log is checked for 500s, 1011s and `internal` socket errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chat_service.security.tokens import AccessTokenCodec
from chat_service.settings import Settings
from tests.helpers import API, TEST_JWT_SECRET, ServerProcess, bearer, free_port, signup
from tests.pg_private import (
    PausableProxy,
    PrivatePostgres,
    StopMode,
    pg_database_fixture,  # noqa: F401  (registers the `pg_database` fixture)
    private_postgres_fixture,  # noqa: F401  (registers the `private_postgres` fixture)
)
from tests.test_scale_out import RedisServer

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py
log = logging.getLogger(__name__)

Json = dict[str, Any]
T = TypeVar("T")
# Far beyond every configured timeout: a reply slower than this is a hang.
HANG_S = 15.0
START_TIMEOUT_S = 60.0
# For the tests that wait on a dead or hung database: it is given up on after about 1 s.
SHORT_DB_TIMEOUTS = {"DB_COMMAND_TIMEOUT_S": "1", "DB_CONNECT_TIMEOUT_S": "1"}
MESSAGE_EVENTS = ("message.new", "message.updated", "message.deleted")
_refs = itertools.count(1)


# --- the service ------------------------------------------------------------------------------


def service_env(database_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    """`server_env`, on another database, with limits out of the way of bulk traffic."""
    return {
        "DATABASE_URL": database_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "AUTO_MIGRATE": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",  # a debug line per frame costs the CPU the traffic needs
        "DATA_DIR": str(workdir / "data"),
        "SIGNUP_IP_LIMIT": "100000/hour",
        "LOGIN_IP_LIMIT": "100000/minute",
        "MESSAGE_RATE_PER_S": "10000",
        "MESSAGE_BURST": "10000",
        **extra,
    }


@contextlib.asynccontextmanager
async def running_server(
    env: dict[str, str], workdir: Path, port: int | None = None
) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(env=env, port=port or free_port(), workdir=workdir)
    await asyncio.to_thread(server.start, START_TIMEOUT_S)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


def failures_logged(server: ServerProcess) -> list[str]:
    """500s, 1011 closes, `internal` socket errors and tracebacks in the server's log, each
    as "<log message>: <the exception's last line>": none may appear in a fault test."""
    found = []
    for line in server.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line:
                found.append(line[:300])
            continue
        if entry.get("level") in ("error", "critical") or "Traceback" in line:
            raised = [
                text
                for text in str(entry.get("exc", "")).splitlines()
                if re.match(r"^[\w.]+(Error|Exception)\b", text)
            ]
            found.append(f"{entry.get('msg')}: {raised[-1][:200] if raised else ''}")
    return found


async def wait_ready(server: ServerProcess, within: float = 20.0) -> None:
    await wait_checks(server, {"database": "ok", "broker": "ok"}, within)


async def wait_checks(server: ServerProcess, checks: dict[str, str], within: float = 20.0) -> None:
    """Poll /readyz until its `checks` are these (whatever the status)."""
    deadline = time.monotonic() + within
    last: Json = {}
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                last = (await http.get(f"{server.url}/readyz")).json()
                if last.get("checks") == checks:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(
        f"/readyz checks not {checks} within {within} s: {last}\n{server.logs()[-3000:]}"
    )


def assert_unavailable(response: httpx.Response, what: str) -> None:
    """The contract's answer while storage is down: 503 `unavailable` with Retry-After."""
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    body = response.json()
    assert body["code"] == "unavailable", f"{what}: {body}"
    assert int(response.headers["Retry-After"]) >= 1, f"{what}: {response.headers}"


async def clocked(awaitable: Awaitable[T]) -> tuple[T, float]:
    """The result and how long it took; a client-side timeout means the service hung."""
    started = time.monotonic()
    try:
        result = await awaitable
    except httpx.TimeoutException as exc:
        raise AssertionError(f"no answer within {HANG_S} s (hung)") from exc
    return result, time.monotonic() - started


# --- accounts and rooms ----------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


async def new_user(http: httpx.AsyncClient, prefix: str) -> User:
    body = await signup(http, f"{prefix}_{secrets.token_hex(4)}")
    return User(body["user"]["id"], body["access_token"])


async def new_room(http: httpx.AsyncClient, owner: User, name: str = "faults") -> str:
    response = await http.post(
        f"{API}/rooms", json={"name": name, "visibility": "public"}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def minted_token() -> str:
    """A well-signed access token for a session the database would have to look up."""
    defaults = Settings.model_fields
    codec = AccessTokenCodec(
        secret=TEST_JWT_SECRET,
        algorithm=str(defaults["jwt_algorithm"].default),
        issuer=str(defaults["jwt_issuer"].default),
        audience=str(defaults["jwt_audience"].default),
        ttl_s=900,
    )
    token, _ = codec.encode(secrets.token_hex(8), secrets.token_hex(8), datetime.now(UTC))
    return str(token)


async def stored_messages(database_url: str, room_id: str | None = None) -> list[asyncpg.Record]:
    """What Postgres holds, read directly (not through the service under test)."""
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        query = "SELECT room_id, seq, change_seq, author_id, client_id, body FROM messages"
        if room_id is None:
            return list(await connection.fetch(query + " ORDER BY room_id, seq"))
        return list(await connection.fetch(query + " WHERE room_id = $1 ORDER BY seq", room_id))
    finally:
        await connection.close()


def contiguous_prefix(seqs: list[int]) -> int:
    """The highest n such that every change 1..n was seen."""
    seen, n = set(seqs), 0
    while n + 1 in seen:
        n += 1
    return n


# --- a WebSocket client -----------------------------------------------------------------------


class Refused(Exception):
    """The handshake was closed with `code` before any hello."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"refused {code}: {reason}")
        self.code = code


class Closed(Exception):
    """The socket closed while a reply was awaited."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed {code}")
        self.code = code


class Chat:
    """A socket read in the background: replies matched by ref, message events kept by room."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.events: dict[str, list[Json]] = {}
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._hello: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._waiters: dict[str, asyncio.Future[Json]] = {}
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, token: str, name: str) -> Chat:
        """Connect and wait for hello; a handshake closed instead raises Refused."""
        ws = await websockets.connect(
            ws_url(server), additional_headers=bearer(token), open_timeout=HANG_S, close_timeout=3
        )
        chat = cls(ws, name)
        try:
            await asyncio.wait_for(asyncio.shield(chat._hello), HANG_S)
        except Closed as exc:
            raise Refused(exc.code, ws.close_reason or "") from None
        except TimeoutError:
            await chat.close()
            raise AssertionError(f"{name}: neither hello nor a close within {HANG_S} s") from None
        return chat

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._dispatch(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            for waiter in [self._hello, *self._waiters.values()]:
                if not waiter.done():
                    waiter.set_exception(Closed(self.close_code))
            if self._hello.done() and not self._hello.cancelled():
                self._hello.exception()  # retrieved: no "never retrieved" warning

    def _dispatch(self, frame: Json) -> None:
        if frame["type"] == "hello" and not self._hello.done():
            self._hello.set_result(frame)
            return
        waiter = self._waiters.get(str(frame.get("ref")))
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        elif frame["type"] in MESSAGE_EVENTS:
            self.events.setdefault(frame["room_id"], []).append(frame)

    async def request(self, frame: Json, within: float = HANG_S) -> Json:
        """Send `frame` with a fresh ref; its reply (or error). Closed if the socket goes."""
        ref = f"f{next(_refs)}"
        waiter: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._waiters[ref] = waiter
        try:
            if self.closed.is_set():
                raise Closed(self.close_code)
            try:
                await self.ws.send(json.dumps({**frame, "ref": ref}))
            except ConnectionClosed:
                await self.closed.wait()
                raise Closed(self.close_code) from None
            try:
                return await asyncio.wait_for(waiter, within)
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: no reply to {frame['type']} within {within} s (hung)"
                ) from None
        finally:
            self._waiters.pop(ref, None)

    async def join(self, room_id: str, since_seq: int | None = None) -> Json:
        frame: Json = {"type": "join", "room_id": room_id}
        if since_seq is not None:
            frame["since_seq"] = since_seq
        reply = await self.request(frame)
        assert reply["type"] == "joined", f"{self.name}: join answered {reply}"
        return reply

    def seen(self, room_id: str) -> list[int]:
        return [event["message"]["change_seq"] for event in self.events.get(room_id, [])]

    async def wait_closed(self, within: float = HANG_S) -> int | None:
        try:
            await asyncio.wait_for(self.closed.wait(), within)
        except TimeoutError:
            raise AssertionError(f"{self.name}: still open after {within} s") from None
        return self.close_code

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


def send_frame(room_id: str, body: str, client_id: str) -> Json:
    return {"type": "message.send", "room_id": room_id, "body": body, "client_id": client_id}


async def handshake_close_code(server: ServerProcess, token: str) -> int | None:
    """The close code of a handshake that must be refused (AssertionError if it is not)."""
    try:
        chat = await Chat.open(server, token, "refused?")
    except Refused as refused:
        return refused.code
    await chat.close()
    raise AssertionError("the handshake was accepted (hello) while it should be refused")


# --- 1. a cold start with Postgres and Redis down ---------------------------------------------


async def test_start_with_postgres_and_redis_down_then_each_recovers(
    private_postgres: PrivatePostgres, pg_database: str, tmp_path: Path
) -> None:
    """The process starts with neither store and stays up: storage refusals while Postgres is
    away, then the degraded mode of docs/scaling.md while only Redis is (every send stored,
    acked and delivered to the process's own sockets), then fully ready. (test_scale_out.py
    covers Redis going away and coming back under two processes.)"""
    private_postgres.stop("fast")
    redis = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    env = service_env(pg_database, tmp_path, BROKER_URL=redis.url, **SHORT_DB_TIMEOUTS)
    try:
        async with (
            running_server(env, tmp_path) as server,
            httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http,
        ):
            assert (await http.get("/healthz")).status_code == 200
            await _without_postgres(server, http)
            await asyncio.to_thread(private_postgres.start)
            await wait_checks(server, {"database": "ok", "broker": "unavailable"})
            await _without_redis_then_with(server, http, redis, pg_database)
            assert not failures_logged(server), _summary(failures_logged(server))
    finally:
        redis.kill()


async def _without_postgres(server: ServerProcess, http: httpx.AsyncClient) -> None:
    """Every route that needs the database answers 503 `unavailable` (not 500, not a hang);
    a socket's handshake is closed 1013."""
    ready = await http.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["checks"] == {"database": "unavailable", "broker": "unavailable"}
    token = minted_token()
    auth = bearer(token)
    account = {"username": "nobody_here", "password": "correct horse battery"}
    calls: list[tuple[str, str, Json]] = [
        ("POST", "/auth/signup", {"json": account}),
        ("POST", "/auth/login", {"json": account}),
        ("POST", "/auth/token", {"data": account}),
        ("GET", "/users/me", {"headers": auth}),
        ("GET", "/rooms", {"headers": auth}),
        ("POST", "/auth/ws-ticket", {"headers": auth}),
    ]
    for method, path, options in calls:
        response, _ = await clocked(http.request(method, API + path, **options))
        assert_unavailable(response, f"{method} {path}")
    assert await handshake_close_code(server, token) == 1013
    assert server.process is not None
    assert server.process.poll() is None, "the process died without its database"


async def _without_redis_then_with(
    server: ServerProcess, http: httpx.AsyncClient, redis: RedisServer, database_url: str
) -> None:
    alice = await new_user(http, "alice")  # the first request once Postgres is there
    bob = await new_user(http, "bob")
    room = await new_room(http, alice)
    a = await Chat.open(server, alice.token, "alice")
    b = await Chat.open(server, bob.token, "bob")
    try:
        for chat in (a, b):
            await chat.join(room)
        ack = await a.request(send_frame(room, "no redis", "nr-1"))
        assert ack["type"] == "ack", ack
        posted = await http.post(
            f"{API}/rooms/{room}/messages", json={"body": "rest"}, headers=bob.headers
        )
        assert posted.status_code == 201, posted.text
        await _wait_for(lambda: b.seen(room) == [1, 2], "local delivery without Redis")

        await asyncio.to_thread(redis.start)
        await wait_ready(server, within=15)  # the subscriber backs off up to 5 s
        after = await a.request(send_frame(room, "redis back", "nr-3"))
        assert after["type"] == "ack", after
        await _wait_for(lambda: b.seen(room) == [1, 2, 3], "delivery after Redis")
    finally:
        await a.close()
        await b.close()
    rows = await stored_messages(database_url)
    assert [(r["seq"], r["client_id"]) for r in rows] == [(1, "nr-1"), (2, None), (3, "nr-3")]


async def _wait_for(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.02)


# --- 2. Postgres restarted and crashed under traffic -----------------------------------------


@dataclass
class Attempt:
    client_id: str
    sent_at: float
    replied_at: float
    outcome: str  # "ack", an error code, or "closed <code>"


@dataclass
class Sender:
    """Sends to one room, one message at a time, retrying a refused one with its client_id."""

    chat: Chat
    room_id: str
    attempts: list[Attempt] = field(default_factory=list)
    acked: dict[str, Json] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    sending: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        client_id = secrets.token_hex(8)
        while not stop.is_set():
            if not self.sending.is_set():
                self.idle.set()
                await self.sending.wait()
                self.idle.clear()
                continue
            sent_at = time.monotonic()
            try:
                reply = await self.chat.request(send_frame(self.room_id, client_id, client_id))
            except Closed as closed:
                self.problems.append(f"{self.chat.name}: socket closed {closed.code} mid-send")
                self.attempts.append(Attempt(client_id, sent_at, time.monotonic(), "closed"))
                return
            outcome = reply["type"] if reply["type"] == "ack" else str(reply.get("code"))
            self.attempts.append(Attempt(client_id, sent_at, time.monotonic(), outcome))
            if outcome == "ack":
                self.acked[client_id] = reply["message"]
                client_id = secrets.token_hex(8)
            elif outcome == "unavailable":
                await asyncio.sleep(0.05)  # retry the same client_id, as the contract says
            else:
                # Not the contract's answer: noted, and the send retried as for `unavailable`.
                self.problems.append(f"{self.chat.name}: send answered {reply}")
                await asyncio.sleep(0.05)
        self.idle.set()


@dataclass(frozen=True)
class Outage:
    mode: str
    down_from: float  # the postmaster (and every backend) is gone
    down_until: float  # start() is about to be called
    up_at: float  # start() has returned: Postgres accepts connections


async def crash(cluster: PrivatePostgres, mode: StopMode | str) -> None:
    if mode == "kill9":
        await asyncio.to_thread(cluster.kill9)
    else:
        await asyncio.to_thread(cluster.stop, mode)  # type: ignore[arg-type]


async def test_postgres_restart_and_crash_under_traffic(
    private_postgres: PrivatePostgres, pg_database: str, tmp_path: Path
) -> None:
    # A small pool: the requests after a restart go through every stale pooled connection.
    env = service_env(pg_database, tmp_path, DB_POOL_SIZE="3", DB_MAX_OVERFLOW="5")
    async with (
        running_server(env, tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http,
    ):
        users = [await new_user(http, f"sender{n}") for n in range(4)]
        room = await new_room(http, users[0])
        senders = []
        for n, user in enumerate(users):
            chat = await Chat.open(server, user.token, f"sender{n}")
            await chat.join(room)
            senders.append(Sender(chat, room))
        stop = asyncio.Event()
        tasks = [asyncio.create_task(sender.run(stop)) for sender in senders]
        try:
            log.info("senders ready")
            await _quiet_restart(private_postgres, senders, http, users[0], room)
            log.info("quiet restart done")
            outages = [
                await _outage_under_traffic(private_postgres, senders, mode)
                for mode in ("fast", "immediate", "kill9")
            ]
        finally:
            stop.set()
            for sender in senders:
                sender.sending.set()
            await asyncio.gather(*tasks)

        log.info("traffic done: %d attempts", sum(len(s.attempts) for s in senders))
        problems = [p for sender in senders for p in sender.problems]
        problems += _check_outages(senders, outages)
        stored = await stored_messages(pg_database, room)
        problems += _check_stored(senders, stored)
        problems += await _check_resume(server, users, senders, room, len(stored))
        log.info("checked: %d stored", len(stored))
        for sender in senders:
            await sender.chat.close()
        problems += failures_logged(server)
        assert not problems, _summary(problems)


async def _pause(senders: list[Sender]) -> None:
    for sender in senders:
        sender.sending.clear()
    await asyncio.gather(*(asyncio.wait_for(s.idle.wait(), HANG_S) for s in senders))


async def _quiet_restart(
    cluster: PrivatePostgres, senders: list[Sender], http: httpx.AsyncClient, user: User, room: str
) -> None:
    """Traffic fills the pool; Postgres restarts while it sits idle; then every request
    succeeds from the first one: stale connections are noticed (pre-ping), not handed out."""
    for sender in senders:
        sender.sending.set()
    await asyncio.sleep(1.0)
    await _pause(senders)
    await asyncio.to_thread(cluster.stop, "fast")
    await asyncio.to_thread(cluster.start)
    for n in range(8):
        response, _ = await clocked(
            http.get(f"{API}/rooms/{room}/messages", params={"limit": 1}, headers=user.headers)
        )
        assert response.status_code == 200, f"request {n + 1} after a restart: {response.text}"
    for n, sender in enumerate(senders):
        reply = await sender.chat.request(send_frame(room, "first after", f"first-after-{n}"))
        assert reply["type"] == "ack", f"send {n + 1} after a restart: {reply}"
        sender.acked[f"first-after-{n}"] = reply["message"]


async def _outage_under_traffic(
    cluster: PrivatePostgres, senders: list[Sender], mode: str
) -> Outage:
    for sender in senders:
        sender.sending.set()
    await asyncio.sleep(0.7)
    started = time.monotonic()
    await crash(cluster, mode)
    down_from = time.monotonic()
    await asyncio.sleep(1.0)
    down_until = time.monotonic()
    await asyncio.to_thread(cluster.start)
    up_at = time.monotonic()
    log.info("%s: crash took %.2f s, start %.2f s", mode, down_from - started, up_at - down_until)
    await asyncio.sleep(0.7)
    return Outage(mode, down_from, down_until, up_at)


def _check_outages(senders: list[Sender], outages: list[Outage]) -> list[str]:
    """While Postgres was gone nothing can have been committed: every send made and answered
    in that window must be refused `unavailable`, and every sender must have seen one. The
    first send after each restart must be acked."""
    problems = []
    for outage in outages:
        for sender in senders:
            inside = [
                a
                for a in sender.attempts
                if outage.down_from < a.sent_at and a.replied_at < outage.down_until
            ]
            if not any(a.outcome == "unavailable" for a in inside):
                problems.append(f"{outage.mode}: {sender.chat.name} saw no `unavailable`")
            wrong = [a for a in inside if a.outcome != "unavailable"]
            if wrong:
                problems.append(f"{outage.mode}: {sender.chat.name} answered while down: {wrong}")
            restarted = [a for a in sender.attempts if a.sent_at > outage.up_at]
            if not restarted or restarted[0].outcome != "ack":
                first = restarted[0] if restarted else None
                problems.append(
                    f"{outage.mode}: first send after restart: {first} ({sender.chat.name})"
                )
    return problems


def _summary(problems: list[str], keep: int = 12) -> str:
    """Problems counted by kind: a flood of one kind hides none of the others."""
    kinds: dict[str, int] = {}
    for problem in problems:
        kind = problem.split("'ref'")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [f"{count} x {kind}" for kind, count in kinds.items()]
    more = [f"... and {len(lines) - keep} more kinds"] if len(lines) > keep else []
    return "\n".join(lines[:keep] + more)


def _check_stored(senders: list[Sender], stored: list[asyncpg.Record]) -> list[str]:
    """Every ack is in Postgres with the acked seq and body; seqs run 1..N."""
    problems = []
    by_client = {(row["author_id"], row["client_id"]): row for row in stored}
    for sender in senders:
        for client_id, message in sender.acked.items():
            row = by_client.get((message["author"]["id"], client_id))
            if row is None:
                problems.append(f"acked but not stored: {client_id} {message}")
            elif (row["seq"], row["body"]) != (message["seq"], message["body"]):
                problems.append(f"acked {message} but stored {dict(row)}")
    seqs = [row["seq"] for row in stored]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"stored seqs are not 1..{len(seqs)}: {seqs}")
    if not all(sender.acked for sender in senders):
        problems.append("a sender never got an ack")
    return problems


async def _check_resume(
    server: ServerProcess, users: list[User], senders: list[Sender], room: str, last_seq: int
) -> list[str]:
    """Each sender reconnects and resumes after the last change it saw in order (again
    from the last change resumed while the reply is truncated, as the guide tells clients):
    with what it saw live, it then has every stored change exactly once."""
    problems = []
    for user, sender in zip(users, senders, strict=True):
        live = sender.chat.seen(room)
        since = contiguous_prefix(live)
        resumed: list[int] = []
        chat = await Chat.open(server, user.token, f"{sender.chat.name} resumed")
        try:
            while True:
                joined = await chat.join(room, since_seq=resumed[-1] if resumed else since)
                resumed += [m["change_seq"] for m in joined["messages"]]
                if not joined["truncated"] or not joined["messages"]:
                    break
        finally:
            await chat.close()
        if resumed != sorted(set(resumed)) or any(seq <= since for seq in resumed):
            problems.append(f"{sender.chat.name}: resume after {since} gave {resumed}")
        if joined["last_seq"] != last_seq or joined["truncated"]:
            problems.append(f"{sender.chat.name}: joined {joined['last_seq']} of {last_seq}")
        if set(live) | set(resumed) != set(range(1, last_seq + 1)):
            missing = set(range(1, last_seq + 1)) - set(live) - set(resumed)
            problems.append(f"{sender.chat.name}: missed {sorted(missing)} after resume")
    return problems


# --- 3. a database that hangs ----------------------------------------------------------------


async def test_hung_database_times_out_to_503_unavailable_and_1013(
    private_postgres: PrivatePostgres, pg_database: str, tmp_path: Path
) -> None:
    proxy = PausableProxy(private_postgres.port)
    proxy.start()
    database = pg_database.rsplit("/", 1)[1]
    env = service_env(
        private_postgres.url(database, port=proxy.port), tmp_path, **SHORT_DB_TIMEOUTS
    )
    try:
        async with (
            running_server(env, tmp_path) as server,
            httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http,
        ):
            alice = await new_user(http, "alice")
            room = await new_room(http, alice)
            chat = await Chat.open(server, alice.token, "alice")
            try:
                await chat.join(room)
                proxy.pause()
                await _while_hung(server, http, chat, alice, room)
                proxy.resume()
                await wait_ready(server)
                # The refused send, resent with its client_id: stored once, whatever the
                # stalled COMMIT did when the proxy let it through.
                ack = await chat.request(send_frame(room, "hung", "hung-1"))
                assert ack["type"] == "ack", ack
            finally:
                await chat.close()
            rows = await stored_messages(pg_database, room)
            assert [r["client_id"] for r in rows] == ["hung-1"], rows
            assert not failures_logged(server), _summary(failures_logged(server))
    finally:
        proxy.close()


async def _while_hung(
    server: ServerProcess, http: httpx.AsyncClient, chat: Chat, alice: User, room: str
) -> None:
    """Everything that needs the database answers `unavailable` within its timeouts, at the
    same time, and liveness answers meanwhile."""
    history = clocked(http.get(f"{API}/rooms/{room}/messages", headers=alice.headers))
    send = clocked(chat.request(send_frame(room, "hung", "hung-1")))
    handshake = clocked(handshake_close_code(server, alice.token))
    ready = clocked(http.get("/readyz"))
    pending = asyncio.gather(history, send, handshake, ready)
    live, _ = await clocked(http.get("/healthz"))
    assert live.status_code == 200
    answers = await pending
    (response, t_history), (reply, t_send), (close_code, t_ws), (readiness, t_ready) = answers
    assert_unavailable(response, "history while the database hangs")
    assert reply["type"] == "error", reply
    assert reply["code"] == "unavailable", reply
    assert close_code == 1013
    assert readiness.status_code == 503, readiness.text
    assert readiness.json()["checks"]["database"] == "unavailable", readiness.text
    # New connections hang as well (the proxy accepts and never answers): the connect
    # timeout fires, not just the command timeout.
    again, t_login = await clocked(
        http.post(f"{API}/auth/login", json={"username": "x" * 3, "password": "y" * 8})
    )
    assert_unavailable(again, "login while the database hangs")
    log.info(
        "hung database: history %.1f s, send %.1f s, handshake %.1f s, readyz %.1f s, login %.1f s",
        *(t_history, t_send, t_ws, t_ready, t_login),
    )


# --- 4. SIGTERM under load, then a reconnect storm -------------------------------------------

STORM_USERS = 20  # 10 sockets each: the default per-user cap, exactly
STORM_SOCKETS = 200
LOAD_SOCKETS = 8  # in a room of their own: the first half send, the others listen
STORM_REFUSALS = {1013, 4429}  # documented "back off and retry" closes
DRAIN_DELAY_S, GRACE_S = 1.0, 10


@dataclass
class Resumer:
    user: User
    room: str
    name: str
    chat: Chat | None = None
    since: int = 0
    refusals: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)


async def test_sigterm_under_load_then_reconnect_storm(
    private_postgres: PrivatePostgres, pg_database: str, tmp_path: Path
) -> None:
    """SIGTERM while senders are busy: every socket (200) is closed 1012, every ack is stored,
    the process exits 0 within the grace period. Then the restarted server takes all 200
    reconnecting at once, each resuming its room with since_seq: every one gets exactly the
    changes it missed, after a documented refusal (1013, 4429) and a retry at most."""
    env = service_env(
        pg_database,
        tmp_path,
        SHUTDOWN_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
        SHUTDOWN_GRACE_S=str(GRACE_S),
    )
    port = free_port()
    first = ServerProcess(env=env, port=port, workdir=tmp_path)
    await asyncio.to_thread(first.start, START_TIMEOUT_S)
    try:
        log.info("storm: first server up")
        resumers, load = await _connect_everyone(first)
        log.info("storm: %d sockets open", len(resumers))
        await _sigterm_under_load(first, load)
        log.info("storm: first server stopped")
    finally:
        await asyncio.to_thread(first.stop)
    problems = await _after_sigterm(resumers, load, pg_database)
    problems += failures_logged(first)
    async with running_server(env, tmp_path, port) as second:
        log.info("storm: second server up")
        problems += await _storm(second, pg_database, resumers)
        log.info("storm: done")
    assert not problems, _summary(problems)


async def _connect_everyone(server: ServerProcess) -> tuple[list[Resumer], list[Sender]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http:
        users = [await new_user(http, f"storm{n}") for n in range(STORM_USERS)]
        load_room, *rooms = [await new_room(http, users[0], f"storm {n}") for n in range(3)]
    resumers = [
        Resumer(users[n % STORM_USERS], load_room if n < LOAD_SOCKETS else rooms[n % 2], f"s{n}")
        for n in range(STORM_SOCKETS)
    ]
    gate = asyncio.Semaphore(20)

    async def connect(resumer: Resumer) -> Chat:
        async with gate:
            chat = await Chat.open(server, resumer.user.token, resumer.name)
            await chat.join(resumer.room)
            resumer.chat = chat
            return chat

    chats = await asyncio.gather(*(connect(r) for r in resumers))
    return resumers, [Sender(chat, load_room) for chat in chats[: LOAD_SOCKETS // 2]]


async def _sigterm_under_load(server: ServerProcess, load: list[Sender]) -> None:
    stop = asyncio.Event()
    for sender in load:
        sender.sending.set()
    tasks = [asyncio.create_task(sender.run(stop)) for sender in load]
    await asyncio.sleep(1.0)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http:
        draining = await _readyz_during_drain(http, DRAIN_DELAY_S)
    code = await asyncio.to_thread(server.process.wait, DRAIN_DELAY_S + GRACE_S + 5)
    took = time.monotonic() - signalled
    stop.set()
    await asyncio.gather(*tasks)
    assert draining.status_code == 503, draining.text
    assert draining.json()["checks"].get("shutdown") == "draining", draining.text
    assert code == 0, f"exit code {code} {took:.1f} s after SIGTERM:\n{server.logs()[-3000:]}"


async def _readyz_during_drain(http: httpx.AsyncClient, within: float) -> httpx.Response:
    """/readyz right after SIGTERM (the signal lands asynchronously: poll briefly)."""
    deadline = time.monotonic() + within
    while True:
        response = await http.get("/readyz")
        if response.status_code == 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def _after_sigterm(
    resumers: list[Resumer], load: list[Sender], database_url: str
) -> list[str]:
    """Every socket got 1012; every sender lost its socket to that and nothing else; every
    ack is stored. Each socket's resume point is the last change it saw in order."""
    problems = []
    for resumer in resumers:
        assert resumer.chat is not None
        code = await resumer.chat.wait_closed()
        if code != 1012:
            problems.append(f"{resumer.name}: closed {code} at SIGTERM")
        resumer.since = contiguous_prefix(resumer.chat.seen(resumer.room))
        await resumer.chat.close()
    for sender in load:
        if not sender.acked or sender.problems != [
            f"{sender.chat.name}: socket closed 1012 mid-send"
        ]:
            problems.append(f"{sender.chat.name}: {len(sender.acked)} acks, {sender.problems}")
    by_room: dict[str, list[asyncpg.Record]] = {}
    for row in await stored_messages(database_url):
        by_room.setdefault(row["room_id"], []).append(row)
    return problems + _check_stored(load, by_room.get(load[0].room_id, []))


async def _storm(server: ServerProcess, database_url: str, resumers: list[Resumer]) -> list[str]:
    problems = []
    async with httpx.AsyncClient(base_url=server.url, timeout=HANG_S) as http:
        owner = resumers[0].user
        for room in sorted({r.room for r in resumers}):
            for n in range(2):  # changes every socket missed while it was away
                await _post(http, owner, room, f"missed {n}")
        last_seq: dict[str, int] = {}
        for row in await stored_messages(database_url):
            last_seq[row["room_id"]] = max(last_seq.get(row["room_id"], 0), row["seq"])
        results = await asyncio.gather(*(_resume(server, r) for r in resumers))
        problems += [p for p in results if p]
        for r in resumers:
            if r.resumed != list(range(r.since + 1, last_seq[r.room] + 1)):
                problems.append(f"{r.name}: resumed after {r.since}: {r.resumed}")
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    if (health.status_code, ready.status_code) != (200, 200):
        problems.append(f"after the storm: healthz {health.status_code}, readyz {ready.text}")
    refusals = [code for r in resumers for code in r.refusals]
    log.info("storm: %d sockets; refusals: %s", len(resumers), refusals)
    problems += [f"refused {code}" for code in refusals if code not in STORM_REFUSALS]
    return problems + failures_logged(server)


async def _post(http: httpx.AsyncClient, user: User, room: str, body: str) -> int:
    response = await http.post(
        f"{API}/rooms/{room}/messages", json={"body": body}, headers=user.headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["seq"])


async def _resume(server: ServerProcess, resumer: Resumer, within: float = 60.0) -> str:
    """Reconnect and resume, backing off on a documented refusal; '' on success."""
    deadline = time.monotonic() + within
    backoff = 0.2
    while time.monotonic() < deadline:
        try:
            chat = await Chat.open(server, resumer.user.token, resumer.name)
        except Refused as refused:
            resumer.refusals.append(refused.code or 0)
            if refused.code not in STORM_REFUSALS:
                return f"{resumer.name}: refused {refused.code}"
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 3.0)
            continue
        try:
            reply = await chat.request(
                {"type": "join", "room_id": resumer.room, "since_seq": resumer.since}
            )
        finally:
            await chat.close()
        if reply["type"] == "joined" and not reply["truncated"]:
            resumer.resumed = [m["change_seq"] for m in reply["messages"]]
            return ""
        if reply.get("code") != "unavailable":
            return f"{resumer.name}: join answered {reply}"
        resumer.refusals.append(1013)
        await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
    return f"{resumer.name}: not resumed within {within} s"
