"""The WebSocket protocol end to end: a real `websockets` client against a real uvicorn server.

Handshake authentication and refusals (close codes a browser can see), join/history/resume,
sends and their acks, fan-out of REST changes, presence, typing, read cursors, token refresh
and expiry, revocation and kicks, malformed frames, limits, and a storage outage.

"Nothing else arrives" is checked with a sentinel where possible: the server handles one
connection's frames in order and queues every event synchronously (or on the next loop turn),
so a `ping` sent afterwards is answered only after anything that was going to be delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from jose import jwt
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from chat_service.domain import send_batch
from chat_service.models import Message
from chat_service.realtime import gateway as gateway_module
from tests.conftest import LiveServer, LiveServerFactory
from tests.frame_schemas import validate_server_frame
from tests.helpers import API, PASSWORD, TEST_JWT_SECRET, bearer, free_port, signup

TIMEOUT_S = 5.0
SKIP = ("presence", "typing")
_refs = itertools.count(1)


def next_ref() -> str:
    return f"r{next(_refs)}"


# --- the client ---------------------------------------------------------------------------


class Client:
    """A websocket speaking the JSON protocol; every read is bounded by a timeout."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.close_reason: str | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, within: float = TIMEOUT_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
        frame: dict[str, Any] = json.loads(raw)
        validate_server_frame(frame)  # every frame the suite sees matches asyncapi.yaml
        return frame

    async def recv_type(
        self, frame_type: str, skip: Iterable[str] = SKIP, within: float = TIMEOUT_S
    ) -> dict[str, Any]:
        """The next frame not of a skipped type; it must be of `frame_type`."""
        skipped = tuple(skip)
        deadline = time.monotonic() + within
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == frame_type:
                return frame
            assert frame["type"] in skipped, f"expected {frame_type!r}, got {frame}"

    async def request(
        self, frame: dict[str, Any], reply: str, skip: Iterable[str] = SKIP
    ) -> dict[str, Any]:
        """Send `frame` with a fresh ref; the next (non-skipped) frame is `reply` echoing it."""
        ref = next_ref()
        await self.send({**frame, "ref": ref})
        answer = await self.recv_type(reply, skip)
        assert answer.get("ref") == ref, answer
        return answer

    async def error(self, frame: dict[str, Any], code: str) -> dict[str, Any]:
        answer = await self.request(frame, "error")
        assert answer["code"] == code, answer
        assert isinstance(answer["detail"], str)
        assert answer["detail"]
        return answer

    async def ping(self, skip: Iterable[str] = ()) -> None:
        """Round trip; with the default `skip=()` nothing may arrive before the pong."""
        await self.request({"type": "ping"}, "pong", skip)

    async def collect(self, seconds: float) -> list[dict[str, Any]]:
        """Every frame arriving within `seconds`."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frames.append(await self.recv(left))
            except TimeoutError:
                break
        return frames

    async def expect_nothing(self, seconds: float = 0.0, skip: Iterable[str] = ()) -> None:
        """No frame (other than skipped types) within `seconds`, nor before a ping's pong."""
        skipped = tuple(skip)
        if seconds:
            frames = [f for f in await self.collect(seconds) if f["type"] not in skipped]
            assert frames == [], frames
        await self.ping(skipped)

    async def expect_close(
        self, code: int, reason: str | None = None, within: float = TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Read until the server closes; assert its close code (and reason); return the frames
        that came before the close."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + within
        closed: ConnectionClosed | None = None
        try:
            while True:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
                frames.append(json.loads(raw))
                validate_server_frame(frames[-1])
        except ConnectionClosed as exc:
            closed = exc
        except TimeoutError:
            pytest.fail(f"no close {code} within {within} s; frames: {frames}")
        assert closed is not None
        assert closed.rcvd is not None, f"closed without a close frame ({closed!r}): {frames}"
        assert closed.rcvd.code == code, (closed.rcvd.code, closed.rcvd.reason, frames)
        self.close_reason = closed.rcvd.reason
        if reason is not None:
            assert reason in closed.rcvd.reason, closed.rcvd.reason
        return frames


# --- the harness --------------------------------------------------------------------------


@dataclass
class User:
    id: str
    username: str
    token: str
    refresh_token: str
    summary: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    @property
    def session_id(self) -> str:
        return str(jwt.get_unverified_claims(self.token)["sid"])


@dataclass
class Harness:
    """One live server, an HTTP client for it, and the sockets opened (closed at the end)."""

    server: LiveServer
    http: httpx.AsyncClient
    sockets: list[Client] = field(default_factory=list)

    @property
    def hub(self) -> Any:
        return self.server.app.state.hub

    # REST

    async def signup(self, username: str) -> User:
        return _user(await signup(self.http, username))

    async def login(self, user: User) -> User:
        response = await self.http.post(
            f"{API}/auth/login", json={"username": user.username, "password": PASSWORD}
        )
        assert response.status_code == 200, response.text
        return _user(response.json())

    async def room(self, owner: User, visibility: str = "public", name: str = "room") -> str:
        response = await self.http.post(
            f"{API}/rooms",
            json={"name": name, "visibility": visibility},
            headers=owner.headers,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def post(self, user: User, room: str, body: str, **extra: Any) -> dict[str, Any]:
        response = await self.http.post(
            f"{API}/rooms/{room}/messages", json={"body": body, **extra}, headers=user.headers
        )
        assert response.status_code in (200, 201), response.text
        message: dict[str, Any] = response.json()
        return message

    async def post_many(self, user: User, room: str, count: int, batch: int = 50) -> None:
        for start in range(0, count, batch):
            await asyncio.gather(
                *(
                    self.post(user, room, f"m{n}")
                    for n in range(start + 1, min(count, start + batch) + 1)
                )
            )

    async def history(self, user: User, room: str, **params: Any) -> list[dict[str, Any]]:
        response = await self.http.get(
            f"{API}/rooms/{room}/messages", params={"limit": 200, **params}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def get_room(self, user: User, room: str) -> httpx.Response:
        return await self.http.get(f"{API}/rooms/{room}", headers=user.headers)

    # WebSocket

    async def open(
        self,
        path: str = "/ws",
        *,
        headers: dict[str, str] | None = None,
        subprotocols: list[str] | None = None,
        origin: str | None = None,
    ) -> Client:
        """A socket whose handshake completed (the server may close it at once)."""
        ws = await connect(
            self.server.ws + path,
            additional_headers=headers,
            subprotocols=[Subprotocol(p) for p in subprotocols] if subprotocols else None,
            origin=Origin(origin) if origin is not None else None,
            open_timeout=TIMEOUT_S,
            close_timeout=2,
            ping_interval=None,
            compression=None,
            max_size=4 * 1024 * 1024,
        )
        client = Client(ws)
        self.sockets.append(client)
        return client

    async def connect(self, user: User, path: str = "/ws", **options: Any) -> Client:
        """An authenticated socket whose `hello` has been read and checked."""
        client = await self.open(path, headers=options.pop("headers", user.headers), **options)
        client.hello = await client.recv()
        assert client.hello["type"] == "hello", client.hello
        assert client.hello["user"] == user.summary
        return client

    async def join(self, client: Client, room: str, **fields: Any) -> dict[str, Any]:
        joined = await client.request({"type": "join", "room_id": room, **fields}, "joined")
        assert joined["room_id"] == room
        return joined

    async def close_all(self) -> None:
        for client in self.sockets:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.close(), 3)


def _user(body: dict[str, Any]) -> User:
    user = body["user"]
    return User(
        id=user["id"],
        username=user["username"],
        token=body["access_token"],
        refresh_token=body["refresh_token"],
        summary={k: user[k] for k in ("id", "username", "display_name")},
    )


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness_factory(
    live_server_factory: LiveServerFactory,
) -> AsyncIterator[HarnessFactory]:
    """`make(**settings_overrides)` starts a live server with those settings, or wraps
    `server=` when given."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(server: LiveServer | None = None, **overrides: Any) -> Harness:
            server = server or await live_server_factory(**overrides)
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.http, timeout=30)
            )
            harness = Harness(server, http)
            stack.push_async_callback(harness.close_all)
            return harness

        yield make


@pytest.fixture
async def h(live: LiveServer, harness_factory: HarnessFactory) -> Harness:
    return await harness_factory(live)


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def token_expiry(token: str) -> datetime:
    return datetime.fromtimestamp(jwt.get_unverified_claims(token)["exp"], UTC)


async def wait_until(condition: Callable[[], bool], within: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def next_presence(client: Client, about: User) -> dict[str, Any]:
    """The next presence event about `about`; only the client's own presence may come first
    (a joining connection is told about itself too)."""
    while True:
        frame = await client.recv_type("presence", skip=("typing",))
        if frame["user"]["id"] == about.id:
            return frame
        assert frame["user"]["id"] == client.hello["user"]["id"], frame


async def insert_messages(engine: AsyncEngine, room: str, author: User, count: int) -> None:
    """`count` messages straight into the database (REST is too slow for a thousand), with the
    room's seq moved on as the service would."""
    async with engine.begin() as db:
        last = (
            await db.execute(sa.text("SELECT last_seq FROM rooms WHERE id = :id"), {"id": room})
        ).scalar_one()
        rows = [
            Message(
                room_id=room, seq=seq, change_seq=seq, author_id=author.id, body=f"m{seq}"
            ).model_dump()
            for seq in range(last + 1, last + count + 1)
        ]
        await db.execute(sa.insert(Message), rows)
        await db.execute(
            sa.text("UPDATE rooms SET last_seq = :seq WHERE id = :id"),
            {"seq": last + count, "id": room},
        )


def seqs(messages: list[dict[str, Any]], key: str = "seq") -> list[int]:
    return [int(m[key]) for m in messages]


# --- 1. handshake -------------------------------------------------------------------------


async def test_bearer_header_handshake_starts_with_hello(h: Harness) -> None:
    alice = await h.signup("alice")
    client = await h.open(headers=alice.headers)
    hello = await client.recv()
    assert set(hello) == {"type", "user", "connection_id", "heartbeat_s", "limits", "expires_at"}
    assert hello["type"] == "hello"
    assert hello["user"] == alice.summary
    assert isinstance(hello["connection_id"], str)
    assert hello["connection_id"]
    assert hello["heartbeat_s"] == 20
    assert hello["limits"] == {
        "message_max_chars": 4000,
        "frame_max_bytes": 64 * 1024,
        "messages_per_s": 10,
        "message_burst": 20,
        "max_rooms": 200,
    }
    assert parse_time(hello["expires_at"]) == token_expiry(alice.token)
    assert client.ws.subprotocol is None
    await client.ping()
    # Each connection has its own id.
    other = await h.connect(alice)
    assert other.hello["connection_id"] != hello["connection_id"]


async def test_subprotocol_handshake_selects_chat_v1_and_never_echoes_the_token(
    h: Harness,
) -> None:
    alice = await h.signup("alice")
    client = await h.connect(alice, headers={}, subprotocols=["chat.v1", f"bearer.{alice.token}"])
    assert client.ws.subprotocol == "chat.v1"
    assert client.ws.response is not None
    assert client.ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["chat.v1"]
    assert alice.token not in str(client.ws.response.headers)
    await client.ping()


async def test_ticket_works_once(h: Harness) -> None:
    alice = await h.signup("alice")
    response = await h.http.post(f"{API}/auth/ws-ticket", headers=alice.headers)
    assert response.status_code == 200, response.text
    ticket = response.json()["ticket"]
    first = await h.connect(alice, f"/ws?ticket={ticket}", headers={})
    await first.ping()
    second = await h.open(f"/ws?ticket={ticket}")
    assert await second.expect_close(4401) == []


async def test_expired_ticket_is_refused_4401(h: Harness, engine: AsyncEngine) -> None:
    alice = await h.signup("alice")
    response = await h.http.post(f"{API}/auth/ws-ticket", headers=alice.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert 5 <= body["expires_in"] <= 60
    async with engine.begin() as db:
        await db.execute(
            sa.text("UPDATE ws_tickets SET expires_at = :past"),
            {"past": datetime.now(UTC) - timedelta(seconds=1)},
        )
    client = await h.open(f"/ws?ticket={body['ticket']}")
    assert await client.expect_close(4401) == []


def _forged_expired_token(user: User) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": user.id,
        "sid": user.session_id,
        "iat": int((now - timedelta(minutes=20)).timestamp()),
        "exp": int((now - timedelta(minutes=5)).timestamp()),
        "iss": "chat-service",
        "aud": "chat-service",
        "typ": "access",
    }
    return str(jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256"))


REFUSED_4401: dict[str, Callable[[User], dict[str, Any]]] = {
    "no-credentials": lambda _u: {},
    "garbage-token": lambda _u: {"headers": bearer("not.a.jwt")},
    "malformed-authorization": lambda u: {"headers": {"Authorization": f"Token {u.token}"}},
    "expired-token": lambda u: {"headers": bearer(_forged_expired_token(u))},
    "token-in-query": lambda u: {"path": f"/ws?access_token={u.token}"},
    "token-in-query-with-header": lambda u: {
        "path": f"/ws?access_token={u.token}",
        "headers": u.headers,
    },
    "bearer-subprotocol-without-chat-v1": lambda u: {"subprotocols": [f"bearer.{u.token}"]},
    "garbage-bearer-subprotocol": lambda _u: {"subprotocols": ["chat.v1", "bearer.garbage"]},
    "token-param-in-query": lambda u: {"path": f"/ws?token={u.token}"},
    "unknown-ticket": lambda _u: {"path": "/ws?ticket=not-a-ticket"},
}


async def check_cases(cases: Iterable[Any], check: Callable[[Any], Awaitable[None]]) -> None:
    """Run `check` for every case; fail once at the end, naming every case that failed."""
    failures = []
    for case in cases:
        try:
            await check(case)
        except (AssertionError, TimeoutError, ConnectionClosed) as exc:
            failures.append(f"{case!r}: {exc!r}")
    assert failures == [], "\n".join(failures)


async def test_bad_credentials_are_accepted_then_closed_4401(h: Harness) -> None:
    alice = await h.signup("alice")

    async def check(case: str) -> None:
        options = REFUSED_4401[case](alice)
        client = await h.open(options.pop("path", "/ws"), **options)
        assert await client.expect_close(4401) == []  # no frame before the close
        assert h.hub.stats()["connections"] == 0

    await check_cases(REFUSED_4401, check)


async def test_revoked_session_is_refused_4401(h: Harness) -> None:
    alice = await h.signup("alice")
    response = await h.http.post(
        f"{API}/auth/logout", json={"refresh_token": alice.refresh_token}, headers=alice.headers
    )
    assert response.status_code == 204, response.text
    client = await h.open(headers=alice.headers)
    assert await client.expect_close(4401) == []
    # The same user's other session still connects.
    await h.connect(await h.login(alice))


async def test_disabled_user_is_refused_4403(h: Harness, engine: AsyncEngine) -> None:
    alice = await h.signup("alice")
    async with engine.begin() as db:
        await db.execute(
            sa.text("UPDATE users SET disabled = :yes WHERE id = :id"),
            {"yes": True, "id": alice.id},
        )
    client = await h.open(headers=alice.headers)
    assert await client.expect_close(4403) == []
    assert h.hub.stats()["connections"] == 0


async def test_foreign_origin_is_refused_4403_by_default(h: Harness) -> None:
    alice = await h.signup("alice")
    client = await h.open(headers=alice.headers, origin="https://evil.example")
    assert await client.expect_close(4403) == []
    same = await h.connect(alice, origin=f"http://127.0.0.1:{h.server.port}")
    await same.ping()


async def test_allowed_and_same_origins_pass(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(ws_allowed_origins=["https://chat.example"])
    alice = await h.signup("alice")
    allowed = await h.connect(alice, origin="https://chat.example")
    await allowed.ping()
    same = await h.connect(alice, origin=f"http://127.0.0.1:{h.server.port}")
    await same.ping()


PORT_PLACEHOLDER = "<port>"
REFUSED_ORIGINS = [
    "https://evil.example",
    "https://chat.example.evil.com",  # suffix
    "https://evil.chat.example",  # subdomain
    "https://chat.exampl",  # prefix
    "https://CHAT.EXAMPLE",  # case
    "HTTPS://chat.example",
    "https://chat.example:8443",  # port
    "http://chat.example",  # scheme
    "https://chat.example/",
    "null",
    "",
    f"http://127.0.0.1:{PORT_PLACEHOLDER}",  # same host, other port
]


async def test_origin_tricks_are_refused_4403(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(ws_allowed_origins=["https://chat.example"])
    alice = await h.signup("alice")

    async def check(origin: str) -> None:
        origin = origin.replace(PORT_PLACEHOLDER, str(free_port()))
        client = await h.open(headers={**alice.headers, "Origin": origin})
        assert await client.expect_close(4403) == []

    await check_cases(REFUSED_ORIGINS, check)
    assert h.hub.stats()["connections"] == 0


async def test_connection_cap_holds_for_concurrent_handshakes(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(max_connections_per_user=2)
    alice = await h.signup("alice")
    clients = await asyncio.gather(*(h.open(headers=alice.headers) for _ in range(6)))
    outcomes: list[str | int | None] = []
    for client in clients:
        try:
            outcomes.append((await client.recv())["type"])
        except ConnectionClosed as exc:
            outcomes.append(exc.rcvd.code if exc.rcvd else None)
    assert sorted(outcomes, key=str) == [4429] * 4 + ["hello"] * 2, outcomes
    assert h.hub.connections_of(alice.id) == 2


async def test_connections_per_user_are_capped_4429(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(max_connections_per_user=2)
    alice, bob = await h.signup("alice"), await h.signup("bob")
    first = await h.connect(alice)
    await h.connect(alice)
    third = await h.open(headers=alice.headers)
    assert await third.expect_close(4429) == []
    await h.connect(bob)  # per user: someone else is not affected
    await first.ws.close()
    await wait_until(lambda: h.hub.connections_of(alice.id) == 1)
    again = await h.connect(alice)
    await again.ping()
    # The contract's 4429: "back off (reason says how long)".
    assert third.close_reason is not None
    assert re.search(r"\d+ ?s\b", third.close_reason), third.close_reason


# --- 2. join ------------------------------------------------------------------------------


async def test_join_returns_recent_history_and_makes_a_member(
    h: Harness, engine: AsyncEngine
) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    await insert_messages(engine, room, alice, 50)
    await h.post_many(alice, room, 5)

    a = await h.connect(alice)
    joined = await h.join(a, room)
    assert set(joined) == {"type", "ref", "room_id", "messages", "last_seq", "truncated", "online"}
    assert seqs(joined["messages"]) == list(range(6, 56))  # the last 50, ascending
    assert joined["last_seq"] == 55
    assert joined["truncated"] is False
    assert [u["id"] for u in joined["online"]] == [alice.id]

    assert (await h.get_room(bob, room)).json()["role"] is None
    b = await h.connect(bob)
    joined = await h.join(b, room, limit=3)
    assert seqs(joined["messages"]) == [53, 54, 55]
    assert joined["last_seq"] == 55
    assert joined["truncated"] is False
    response = await h.get_room(bob, room)
    assert response.status_code == 200
    assert response.json()["role"] == "member"


async def test_join_since_seq_returns_every_change_in_order(h: Harness) -> None:
    alice = await h.signup("alice")
    room = await h.room(alice)
    for n in range(1, 6):
        await h.post(alice, room, f"m{n}")
    response = await h.http.patch(
        f"{API}/rooms/{room}/messages/1", json={"body": "m1 edited"}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    response = await h.http.delete(f"{API}/rooms/{room}/messages/3", headers=alice.headers)
    assert response.status_code == 204, response.text

    a = await h.connect(alice)
    joined = await h.join(a, room, since_seq=2)
    messages = joined["messages"]
    assert seqs(messages, "change_seq") == [4, 5, 6, 7]
    assert seqs(messages) == [4, 5, 1, 3]
    assert messages[2]["body"] == "m1 edited"
    assert messages[2]["edited_at"] is not None
    assert (messages[3]["body"], messages[3]["deleted"]) == ("", True)
    assert joined["last_seq"] == 7
    assert joined["truncated"] is False
    # Up to date: nothing.
    joined = await h.join(a, room, since_seq=7)
    assert (joined["messages"], joined["last_seq"], joined["truncated"]) == ([], 7, False)


async def test_join_since_seq_truncates_after_1000_changes(h: Harness, engine: AsyncEngine) -> None:
    alice = await h.signup("alice")
    room = await h.room(alice)
    await h.post_many(alice, room, 3)
    await insert_messages(engine, room, alice, 1000)
    a = await h.connect(alice)
    joined = await h.join(a, room, since_seq=1)  # 1002 changes after seq 1
    assert joined["truncated"] is True
    assert len(joined["messages"]) == 1000
    assert seqs(joined["messages"], "change_seq") == list(range(2, 1002))
    assert joined["last_seq"] == 1003
    joined = await h.join(a, room, since_seq=3)  # exactly 1000: complete
    assert joined["truncated"] is False
    assert seqs(joined["messages"], "change_seq") == list(range(4, 1004))


async def test_join_during_concurrent_sends_misses_and_repeats_nothing(
    harness_factory: HarnessFactory,
) -> None:
    """History plus live events, across a join racing with commits: every change once, in
    order."""
    h = await harness_factory(message_rate_per_s=1000, message_burst=1000)
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    base = 0
    for delay in (0.0, 0.05, 0.15):
        b = await h.connect(bob)
        sending = asyncio.gather(*(h.post(alice, room, f"m{n}") for n in range(25)))
        await asyncio.sleep(delay)
        joined = await h.join(b, room, since_seq=base)
        await asyncio.wait_for(sending, 30)
        got = seqs(joined["messages"], "change_seq")
        while len(got) < 25:
            got.append((await b.recv_type("message.new"))["message"]["change_seq"])
        assert got == list(range(base + 1, base + 26)), (delay, len(joined["messages"]), got)
        await b.expect_nothing(skip=("presence",))
        await b.ws.close()
        base += 25


async def test_join_refuses_invisible_and_unknown_rooms(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    private = await h.room(alice, visibility="private")
    b = await h.connect(bob)
    for room in (private, "no-such-room"):
        await b.error({"type": "join", "room_id": room}, "not_found")
    assert h.hub.stats()["subscriptions"] == 0
    assert (await h.get_room(bob, private)).status_code == 404  # not made a member either
    await b.ping()


async def test_room_url_joins_at_connect(h: Harness) -> None:
    alice = await h.signup("alice")
    room = await h.room(alice)
    await h.post(alice, room, "before")
    client = await h.connect(alice, f"/ws/rooms/{room}")
    joined = await client.recv_type("joined")
    assert joined["room_id"] == room
    assert [m["body"] for m in joined["messages"]] == ["before"]
    assert joined["last_seq"] == 1
    await h.post(alice, room, "after")
    event = await client.recv_type("message.new")
    assert event["message"]["body"] == "after"


async def test_room_url_for_invisible_room_closes_4404(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    private = await h.room(alice, visibility="private")

    async def check(room: str) -> None:
        client = await h.open(f"/ws/rooms/{room}", headers=bob.headers)
        frames = await client.expect_close(4404)
        assert [f["type"] for f in frames] in ([], ["hello"]), frames

    # An id longer than any room's is just another room that does not exist.
    await check_cases([private, "no-such-room", "x" * 65], check)
    assert h.hub.stats()["subscriptions"] == 0


async def test_presence_is_per_user_not_per_tab(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    a = await h.connect(alice)
    await h.join(a, room)

    b1 = await h.connect(bob)
    joined = await h.join(b1, room)
    assert {u["id"] for u in joined["online"]} == {alice.id, bob.id}
    presence = await next_presence(a, bob)
    assert presence == {
        "type": "presence",
        "room_id": room,
        "user": bob.summary,
        "status": "online",
    }
    again = await h.join(a, room)  # a fresh view for alice lists both
    assert {u["id"] for u in again["online"]} == {alice.id, bob.id}

    b2 = await h.connect(bob)
    await h.join(b2, room)
    await a.expect_nothing()  # the second tab is not announced

    await b1.request({"type": "leave", "room_id": room}, "left")
    await a.expect_nothing()  # bob is still there in his other tab

    await b2.ws.close()
    presence = await next_presence(a, bob)
    assert presence == {
        "type": "presence",
        "room_id": room,
        "user": bob.summary,
        "status": "offline",
    }
    again = await h.join(a, room)
    assert [u["id"] for u in again["online"]] == [alice.id]


# --- 3. send ------------------------------------------------------------------------------


async def test_send_acks_then_fans_out_to_every_subscriber(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    a1, a2, b = await h.connect(alice), await h.connect(alice), await h.connect(bob)
    for client in (a1, a2, b):
        await h.join(client, room)

    await a1.send(
        {"type": "message.send", "ref": "s1", "room_id": room, "body": "hi", "client_id": "c-1"}
    )
    ack = await a1.recv_type("ack")  # the ack comes before the message.new
    assert set(ack) == {"type", "ref", "client_id", "message"}
    assert (ack["ref"], ack["client_id"]) == ("s1", "c-1")
    message = ack["message"]
    assert message["body"] == "hi"
    assert message["author"] == alice.summary
    assert (message["seq"], message["change_seq"], message["room_id"]) == (1, 1, room)
    assert message["client_id"] == "c-1"
    assert message["deleted"] is False

    for client in (a1, a2, b):
        event = await client.recv_type("message.new")
        assert event == {"type": "message.new", "room_id": room, "message": message}
        await client.expect_nothing(skip=SKIP)
    # The frames carry the message exactly as the REST API gives it, timestamps included.
    assert await h.history(alice, room) == [message]


async def test_resend_with_same_client_id_acks_the_original_once(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    a, b = await h.connect(alice), await h.connect(bob)
    await h.join(a, room)
    await h.join(b, room)
    frame = {"type": "message.send", "room_id": room, "body": "once", "client_id": "dup"}
    first = await a.request(frame, "ack")
    await a.recv_type("message.new")
    await b.recv_type("message.new")

    second = await a.request({**frame, "body": "changed"}, "ack")
    assert second["message"] == first["message"]
    assert second["client_id"] == "dup"
    await a.expect_nothing(skip=("presence",))
    await b.expect_nothing(skip=("presence",))
    assert [m["body"] for m in await h.history(alice, room)] == ["once"]


INVALID_SENDS: list[tuple[dict[str, Any], str]] = [
    ({"body": ""}, "invalid_frame"),
    ({"body": "   \n\t"}, "invalid_frame"),
    ({"body": "x" * 4001}, "too_large"),
    ({"client_id": None}, "invalid_frame"),  # missing
    ({"client_id": ""}, "invalid_frame"),
    ({"client_id": "has space"}, "invalid_frame"),
    ({"client_id": "x" * 65}, "invalid_frame"),
    ({"body": 5}, "invalid_frame"),
    ({"body": None}, "invalid_frame"),  # missing
    ({"room_id": None}, "invalid_frame"),  # missing
]


async def test_invalid_sends_are_refused(h: Harness) -> None:
    alice = await h.signup("alice")
    room = await h.room(alice)
    a = await h.connect(alice)
    await h.join(a, room)

    async def check(case: tuple[dict[str, Any], str]) -> None:
        fields, code = case
        frame = {"type": "message.send", "room_id": room, "body": "ok", "client_id": "c"}
        frame = {k: v for k, v in {**frame, **fields}.items() if v is not None}
        await a.error(frame, code)
        await a.expect_nothing(skip=("presence",))  # no ack, no message.new

    await check_cases(INVALID_SENDS, check)
    assert await h.history(alice, room) == []


async def test_a_4000_character_body_is_accepted(h: Harness) -> None:
    alice = await h.signup("alice")
    room = await h.room(alice)
    a = await h.connect(alice)
    body = "é" * 4000
    frame = {"type": "message.send", "room_id": room, "body": body, "client_id": "long"}
    ack = await a.request(frame, "ack")
    assert ack["message"]["body"] == body


async def test_send_outside_membership_is_refused(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    public = await h.room(alice)
    private = await h.room(alice, visibility="private")
    b = await h.connect(bob)
    for room, code in ((public, "forbidden"), (private, "not_found"), ("nope", "not_found")):
        frame = {"type": "message.send", "room_id": room, "body": "hi", "client_id": "c"}
        await b.error(frame, code)
    assert await h.history(alice, public) == []
    assert await h.history(alice, private) == []


async def test_rest_changes_reach_subscribers(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    b = await h.connect(bob)
    await h.join(b, room)

    sent = await h.post(alice, room, "from rest", client_id="rest-1")
    event = await b.recv_type("message.new")
    assert event == {"type": "message.new", "room_id": room, "message": sent}

    response = await h.http.patch(
        f"{API}/rooms/{room}/messages/1", json={"body": "edited"}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    event = await b.recv_type("message.updated")
    assert event["room_id"] == room
    assert event["message"] == response.json()
    assert (event["message"]["seq"], event["message"]["change_seq"]) == (1, 2)
    assert event["message"]["body"] == "edited"
    assert event["message"]["edited_at"] is not None

    response = await h.http.delete(f"{API}/rooms/{room}/messages/1", headers=alice.headers)
    assert response.status_code == 204, response.text
    event = await b.recv_type("message.deleted")
    assert event["room_id"] == room
    deleted = event["message"]
    assert (deleted["id"], deleted["seq"], deleted["change_seq"]) == (sent["id"], 1, 3)
    assert (deleted["body"], deleted["deleted"]) == ("", True)
    await b.expect_nothing(skip=("presence",))


# --- 4. typing ----------------------------------------------------------------------------


async def test_typing_goes_to_others_once_per_second(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    other = await h.room(alice, name="other")
    a, b = await h.connect(alice), await h.connect(bob)
    await h.join(a, room)
    await h.join(b, room)
    await next_presence(a, bob)  # bob came online

    await a.send({"type": "typing", "room_id": room})
    typing = await b.recv_type("typing", skip=("presence",))
    assert typing == {"type": "typing", "room_id": room, "user": alice.summary}
    await a.expect_nothing()  # the sender does not get its own typing

    started = time.monotonic()
    await a.send({"type": "typing", "room_id": room})
    await a.ping()  # processed: the second typing (within 1 s) was dropped
    await b.expect_nothing(skip=("presence",))

    await asyncio.sleep(max(0.0, 1.05 - (time.monotonic() - started)))
    await a.send({"type": "typing", "room_id": room})
    await b.recv_type("typing", skip=("presence",))

    await a.error({"type": "typing", "room_id": other}, "forbidden")  # not joined
    await b.expect_nothing(skip=("presence",))


# --- 5. read, ping, leave -----------------------------------------------------------------


async def test_read_moves_the_cursor(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    b = await h.connect(bob)
    await h.join(b, room)
    for n in range(3):
        await h.post(alice, room, f"m{n}")
    assert (await h.get_room(bob, room)).json()["unread_count"] == 3

    await b.send({"type": "read", "room_id": room, "seq": 2})
    await b.ping(skip=("message.new", "presence"))  # the read was handled before the pong
    assert (await h.get_room(bob, room)).json()["unread_count"] == 1
    await b.send({"type": "read", "room_id": room, "seq": 3})
    await b.ping(skip=("message.new", "presence"))
    assert (await h.get_room(bob, room)).json()["unread_count"] == 0


async def test_ping_answers_pong_with_ref(h: Harness) -> None:
    alice = await h.signup("alice")
    a = await h.connect(alice)
    await a.send({"type": "ping", "ref": 42})
    assert await a.recv() == {"type": "pong", "ref": 42}
    await a.send({"type": "ping", "ref": "abc"})
    assert await a.recv() == {"type": "pong", "ref": "abc"}
    await a.send({"type": "ping"})
    assert await a.recv() == {"type": "pong"}


async def test_leave_stops_the_room_events(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    b = await h.connect(bob)
    await h.join(b, room)
    left = await b.request({"type": "leave", "room_id": room}, "left")
    assert left["room_id"] == room
    assert set(left) == {"type", "ref", "room_id"}

    await h.post(alice, room, "after leave")
    await b.expect_nothing(0.5)
    assert (await h.get_room(bob, room)).json()["role"] == "member"  # membership stays


# --- 6. auth.refresh and expiry -----------------------------------------------------------


async def test_auth_refresh_accepts_only_the_same_user(h: Harness) -> None:
    alice, mallory = await h.signup("alice"), await h.signup("mallory")
    a = await h.connect(alice)
    fresh = await h.login(alice)
    refreshed = await a.request(
        {"type": "auth.refresh", "access_token": fresh.token}, "auth.refreshed"
    )
    assert set(refreshed) == {"type", "ref", "expires_at"}
    assert parse_time(refreshed["expires_at"]) == token_expiry(fresh.token)

    await a.error({"type": "auth.refresh", "access_token": mallory.token}, "forbidden")
    await a.ping()
    await a.error({"type": "auth.refresh", "access_token": "garbage"}, "forbidden")
    await a.ping()
    await a.error(
        {"type": "auth.refresh", "access_token": _forged_expired_token(alice)}, "forbidden"
    )
    await a.ping()


async def test_expired_access_closes_4401_unless_refreshed(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(access_token_ttl_s=5)
    alice = await h.signup("alice")
    plain = await h.connect(alice)
    refreshing = await h.connect(alice)
    for client in (plain, refreshing):
        expiring = await client.recv()  # under 60 s left: the notice comes at once
        assert expiring == {"type": "auth.expiring", "expires_at": client.hello["expires_at"]}
    first_expiry = parse_time(plain.hello["expires_at"]).timestamp()

    async def expire_plain() -> float:
        assert await plain.expect_close(4401, within=8) == []
        return time.time()

    async def refresh_then_expire() -> tuple[float, float]:
        await asyncio.sleep(2)
        fresh = await h.login(alice)
        refreshed = await refreshing.request(
            {"type": "auth.refresh", "access_token": fresh.token}, "auth.refreshed"
        )
        new_expiry = parse_time(refreshed["expires_at"])
        assert new_expiry.timestamp() >= first_expiry + 1
        notice = await refreshing.recv()
        assert notice == {"type": "auth.expiring", "expires_at": refreshed["expires_at"]}
        assert await refreshing.expect_close(4401, within=9) == []
        return time.time(), new_expiry.timestamp()

    plain_closed, (refreshed_closed, second_expiry) = await asyncio.gather(
        expire_plain(), refresh_then_expire()
    )
    assert first_expiry - 0.1 <= plain_closed <= first_expiry + 1.5
    assert second_expiry - 0.1 <= refreshed_closed <= second_expiry + 1.5
    assert refreshed_closed > plain_closed + 0.5


# --- 7. revocation and kicks --------------------------------------------------------------


async def test_logout_closes_that_sessions_sockets(h: Harness) -> None:
    alice = await h.signup("alice")
    other_session = await h.login(alice)
    a1, a2 = await h.connect(alice), await h.connect(alice)
    kept = await h.connect(other_session)
    response = await h.http.post(
        f"{API}/auth/logout", json={"refresh_token": alice.refresh_token}, headers=alice.headers
    )
    assert response.status_code == 204, response.text
    for client in (a1, a2):
        assert await client.expect_close(4401) == []
    await kept.ping()


async def test_removed_member_gets_room_removed_and_nothing_more(h: Harness) -> None:
    alice, bob, carol = await h.signup("alice"), await h.signup("bob"), await h.signup("carol")
    room = await h.room(alice)
    b1, b2, c = await h.connect(bob), await h.connect(bob), await h.connect(carol)
    for client in (b1, b2, c):
        await h.join(client, room)

    response = await h.http.delete(f"{API}/rooms/{room}/members/{bob.id}", headers=alice.headers)
    assert response.status_code == 204, response.text
    for client in (b1, b2):
        removed = await client.recv_type("room.removed")
        assert removed == {"type": "room.removed", "room_id": room, "reason": "removed"}
    await c.expect_nothing(skip=("presence",))  # carol is not told she was removed

    await h.post(alice, room, "after removal")
    assert (await c.recv_type("message.new"))["message"]["body"] == "after removal"
    for client in (b1, b2):
        await client.expect_nothing(skip=())
        await client.error({"type": "typing", "room_id": room}, "forbidden")  # unsubscribed


async def test_leaving_over_rest_ends_the_subscriptions(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    b = await h.connect(bob)
    await h.join(b, room)
    response = await h.http.post(f"{API}/rooms/{room}/leave", headers=bob.headers)
    assert response.status_code == 204, response.text
    removed = await b.recv_type("room.removed")
    assert removed == {"type": "room.removed", "room_id": room, "reason": "left"}
    await h.post(alice, room, "after leaving")
    await b.expect_nothing(skip=())


async def test_removal_racing_a_join_leaves_no_phantom_subscription(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob is removed while his join reads the history: he must not end up with a `joined`
    after the `room.removed` (a client would think it is subscribed and get nothing)."""
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    assert (await h.http.post(f"{API}/rooms/{room}/join", headers=bob.headers)).is_success
    service = h.server.app.state.history
    original = service.snapshot

    async def removal_meanwhile(*args: Any, **kwargs: Any) -> Any:
        snapshot = await original(*args, **kwargs)
        response = await h.http.delete(
            f"{API}/rooms/{room}/members/{bob.id}", headers=alice.headers
        )
        assert response.status_code == 204, response.text
        await asyncio.sleep(0.05)  # the removal event is dispatched before `joined` is queued
        return snapshot

    monkeypatch.setattr(service, "snapshot", removal_meanwhile)
    b = await h.connect(bob)
    await b.send({"type": "join", "room_id": room, "ref": "j"})
    frames = [f for f in await b.collect(1.0) if f["type"] not in SKIP]
    types = [f["type"] for f in frames]
    assert "room.removed" in types, frames
    assert "joined" not in types[types.index("room.removed") :], frames
    assert h.hub.stats()["subscriptions"] == 0


async def test_room_updates_and_deletion_reach_subscribers(h: Harness) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    a, b = await h.connect(alice), await h.connect(bob)
    await h.join(a, room)
    await h.join(b, room)

    response = await h.http.patch(
        f"{API}/rooms/{room}", json={"name": "renamed"}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    for client in (a, b):
        updated = await client.recv_type("room.updated")
        assert set(updated) == {"type", "room_id", "room"}
        assert updated["room_id"] == room
        assert updated["room"]["id"] == room
        assert updated["room"]["name"] == "renamed"

    response = await h.http.delete(f"{API}/rooms/{room}", headers=alice.headers)
    assert response.status_code == 204, response.text
    for client in (a, b):
        assert await client.recv_type("room.deleted") == {"type": "room.deleted", "room_id": room}
        await client.expect_nothing(skip=("presence",))
        await client.error({"type": "typing", "room_id": room}, "forbidden")  # unsubscribed
    assert h.hub.stats()["subscriptions"] == 0


# --- 8. errors and limits -----------------------------------------------------------------


MALFORMED: list[tuple[str, str, str | int | None]] = [
    ("{not json", "invalid_json", None),
    ("", "invalid_json", None),
    ("[1, 2]", "invalid_frame", None),
    ("5", "invalid_frame", None),
    ('"ping"', "invalid_frame", None),
    ("null", "invalid_frame", None),
    ('{"ref": "x"}', "invalid_frame", "x"),
    ('{"type": 5, "ref": "x"}', "invalid_frame", "x"),
    ('{"type": null}', "invalid_frame", None),
    ('{"type": "nope", "ref": "x"}', "unknown_type", "x"),
    ('{"type": "PING"}', "unknown_type", None),
    ('{"type": "join", "room_id": "r", "since_seq": "5", "ref": 1}', "invalid_frame", 1),
    ('{"type": "join", "room_id": "r", "since_seq": -1}', "invalid_frame", None),
    ('{"type": "join", "room_id": "r", "limit": 201}', "invalid_frame", None),
    ('{"type": "join", "room_id": "r", "limit": 0}', "invalid_frame", None),
    ('{"type": "join", "room_id": 5}', "invalid_frame", None),
    ('{"type": "join", "room_id": ""}', "invalid_frame", None),
    ('{"type": "join"}', "invalid_frame", None),
    ('{"type": "read", "room_id": "r", "seq": true, "ref": "x"}', "invalid_frame", "x"),
    ('{"type": "read", "room_id": "r", "seq": 1.5}', "invalid_frame", None),
    ('{"type": "ping", "extra": 1, "ref": "x"}', "invalid_frame", "x"),
    ('{"type": "leave", "room_id": "r", "since_seq": 1}', "invalid_frame", None),
    ('{"type": "auth.refresh"}', "invalid_frame", None),
]


async def test_malformed_frames_get_errors_and_the_socket_lives_on(h: Harness) -> None:
    alice = await h.signup("alice")
    a = await h.connect(alice)  # one socket for all: it must survive every case

    async def check(case: tuple[str, str, str | int | None]) -> None:
        raw, code, ref = case
        await a.send_raw(raw)
        error = await a.recv()
        assert error["type"] == "error", error
        assert error["code"] == code, error
        assert error.get("ref") == ref, error
        assert error["detail"]
        await a.ping()

    await check_cases(MALFORMED, check)


async def test_binary_frames_are_refused(h: Harness) -> None:
    alice = await h.signup("alice")
    a = await h.connect(alice)
    await a.send_raw(json.dumps({"type": "ping"}).encode())
    error = await a.recv()
    assert (error["type"], error["code"]) == ("error", "invalid_frame")
    await a.ping()


async def test_frame_over_64_kib_closes_1009(h: Harness) -> None:
    alice = await h.signup("alice")
    a = await h.connect(alice)
    near = json.dumps({"type": "ping", "ref": "x" * (60 * 1024)})
    await a.send_raw(near)
    assert (await a.recv())["type"] == "pong"  # under the limit: fine
    await a.send_raw(json.dumps({"type": "ping", "ref": "x" * (64 * 1024)}))
    assert await a.expect_close(1009) == []


async def test_rooms_per_connection_are_capped(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(max_rooms_per_connection=2)
    alice = await h.signup("alice")
    rooms = [await h.room(alice, name=f"r{n}") for n in range(3)]
    a = await h.connect(alice)
    assert a.hello["limits"]["max_rooms"] == 2
    await h.join(a, rooms[0])
    await h.join(a, rooms[1])
    await a.error({"type": "join", "room_id": rooms[2]}, "forbidden")
    await h.join(a, rooms[0])  # joining again is not one more room
    await a.request({"type": "leave", "room_id": rooms[0]}, "left")
    await h.join(a, rooms[2])
    # Another connection has its own budget.
    other = await h.connect(alice)
    await h.join(other, rooms[0])


async def test_message_rate_limit(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(message_rate_per_s=2, message_burst=3)
    alice = await h.signup("alice")
    room = await h.room(alice)
    a = await h.connect(alice)
    assert (a.hello["limits"]["messages_per_s"], a.hello["limits"]["message_burst"]) == (2, 3)
    for n in range(6):  # not joined: only the replies come back
        await a.send(
            {"type": "message.send", "ref": n, "room_id": room, "body": "x", "client_id": f"c{n}"}
        )
    replies = [await a.recv() for _ in range(6)]
    assert [r["type"] for r in replies] == ["ack"] * 3 + ["error"] * 3, replies
    assert [r["ref"] for r in replies] == list(range(6))
    for error in replies[3:]:
        assert error["code"] == "rate_limited"
        assert type(error["retry_after"]) is int
        assert error["retry_after"] >= 1
    assert len(await h.history(alice, room)) == 3
    await a.ping()


async def test_message_rate_limit_is_per_user_across_connections(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(message_rate_per_s=2, message_burst=3)
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    await h.http.post(f"{API}/rooms/{room}/join", headers=bob.headers)
    a1, a2, b = await h.connect(alice), await h.connect(alice), await h.connect(bob)

    def send(n: int) -> dict[str, Any]:
        return {"type": "message.send", "room_id": room, "body": "x", "client_id": f"c{n}"}

    await a1.request(send(1), "ack")
    await a1.request(send(2), "ack")
    await a2.request(send(3), "ack")
    error = await a2.error(send(4), "rate_limited")
    assert error["retry_after"] >= 1
    await b.request(send(5), "ack")  # another user has their own budget


async def test_sustained_flooding_closes_4429(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(message_rate_per_s=1, message_burst=1)
    alice = await h.signup("alice")
    room = await h.room(alice)
    a = await h.connect(alice)
    with contextlib.suppress(ConnectionClosed):
        for n in range(70):
            await a.send(
                {"type": "message.send", "room_id": room, "body": "x", "client_id": f"c{n}"}
            )
    frames = await a.expect_close(4429, reason="back off")
    assert [f["type"] for f in frames[:1]] == ["ack"]
    refusals = [f for f in frames if f["type"] == "error"]
    assert all(f["code"] == "rate_limited" for f in refusals)
    assert 50 <= len(refusals) <= 51
    assert len(frames) == 1 + len(refusals)


# --- 9. storage unavailable ---------------------------------------------------------------


async def test_storage_outage_answers_unavailable_and_stores_nothing(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = await h.signup("alice"), await h.signup("bob")
    room = await h.room(alice)
    a, b = await h.connect(alice), await h.connect(bob)
    await h.join(a, room)
    await h.join(b, room)

    original = send_batch.read_facts
    calls = 0

    async def fail_once(*args: Any, **kwargs: Any) -> Any:  # the batch's first statement
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("x", {}, Exception("down"))
        return await original(*args, **kwargs)

    monkeypatch.setattr(send_batch, "read_facts", fail_once)
    frame = {"type": "message.send", "room_id": room, "body": "hello", "client_id": "retry-me"}
    await a.send({**frame, "ref": "u1"})
    error = await a.recv_type("error")
    assert (error["code"], error["ref"]) == ("unavailable", "u1")
    await a.expect_nothing(skip=("presence",))  # no ack, no message.new
    await b.expect_nothing(skip=("presence",))
    assert await h.history(alice, room) == []

    ack = await a.request(frame, "ack")
    assert ack["client_id"] == "retry-me"
    for client in (a, b):
        assert (await client.recv_type("message.new"))["message"] == ack["message"]
    again = await a.request(frame, "ack")
    assert again["message"] == ack["message"]
    await b.expect_nothing(skip=("presence",))
    stored = await h.history(alice, room)
    assert [(m["body"], m["client_id"]) for m in stored] == [("hello", "retry-me")]
    assert calls == 3


async def test_sends_waiting_for_their_commit_do_not_hold_up_the_next_frames(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """message.send is pipelined: later frames are answered while a send waits for its
    commit; the sends are still stored and acked in order; past MAX_SENDS_IN_FLIGHT the
    connection's next frame waits."""
    alice = await h.signup("alice")
    room = await h.room(alice)
    a = await h.connect(alice)
    await h.join(a, room)
    held = asyncio.Event()
    original = send_batch.read_facts

    async def held_until_released(*args: Any, **kwargs: Any) -> Any:
        await held.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(send_batch, "read_facts", held_until_released)
    monkeypatch.setattr(gateway_module, "MAX_SENDS_IN_FLIGHT", 2)
    for n in (1, 2):
        send = {"type": "message.send", "room_id": room, "body": f"m{n}", "client_id": f"p{n}"}
        await a.send({**send, "ref": f"s{n}"})
    pong = await a.request({"type": "ping"}, "pong", skip=("presence",))
    assert pong["type"] == "pong", "a ping after two held sends is answered at once"

    third = {"type": "message.send", "room_id": room, "body": "m3", "client_id": "p3"}
    await a.send({**third, "ref": "s3"})  # the third in flight: waits for the first
    await a.send({"type": "ping", "ref": "late"})
    with contextlib.suppress(TimeoutError):  # nothing but presence while the sends are held
        async with asyncio.timeout(0.3):
            while True:
                assert json.loads(await a.ws.recv())["type"] == "presence"

    held.set()
    acks = [await a.recv_type("ack", skip=("presence", "message.new")) for _ in range(2)]
    assert [(ack["ref"], ack["message"]["seq"]) for ack in acks] == [("s1", 1), ("s2", 2)]
    rest = [await a.recv_type(t, skip=("presence", "message.new")) for t in ("pong", "ack")]
    assert rest[0]["ref"] == "late"
    assert (rest[1]["ref"], rest[1]["message"]["seq"]) == ("s3", 3)
