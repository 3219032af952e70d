"""Presence, the online list and the per-user connection cap across real server processes
sharing one Redis (realtime/presence.py): a user is online once however many sockets and
servers hold them, a crashed (kill -9) server's users go offline after PRESENCE_TTL_S, and a
frozen Redis is noticed by readiness.

Each test owns a throwaway redis-server, so it can freeze or lose it without touching the
machine's Redis that other tests use.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.helpers import API, ServerProcess
from tests.test_scale_out import (
    Json,
    RedisServer,
    Socket,
    Sockets,
    User,
    base_env,
    new_room,
    new_user,
    readyz,
    rest,
    scaled_env,
    send_frame,
    sockets,
    start_servers,
    stop_servers,
    wait_readyz,
)

__all__ = ["sockets"]  # the fixture, shared with test_scale_out

pytestmark = pytest.mark.backend_independent(suite="postgres")  # see tests/conftest.py

PRESENCE_TTL_S = 3.0
# Renewed every third of the TTL; the sweep runs on the next renewal after it lapses.
OFFLINE_WITHIN_S = PRESENCE_TTL_S + PRESENCE_TTL_S / 3 + 6.0  # + slack for a loaded machine
CAP = 3


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        if redis.process is not None and redis.process.poll() is None:
            redis.process.send_signal(signal.SIGCONT)  # a test may leave it frozen
        redis.kill()


def start_pair(env: dict[str, str], workdir: Path, redis_url: str) -> list[ServerProcess]:
    env = scaled_env(
        env, redis_url, PRESENCE_TTL_S=str(PRESENCE_TTL_S), MAX_CONNECTIONS_PER_USER=str(CAP)
    )
    return start_servers(env, workdir, 2)


@pytest.fixture
def pair(
    server_env: dict[str, str], tmp_path: Path, own_redis: RedisServer
) -> Iterator[list[ServerProcess]]:
    """Two servers on a Redis of this test's own, for tests that break one or the other."""
    servers = start_pair(server_env, tmp_path, own_redis.url)
    try:
        yield servers
    finally:
        stop_servers(servers)


@pytest.fixture(scope="module")
def shared_pair(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    """Two servers on a Redis of this module's own, for the tests that break nothing (server
    starts are the slow part). Each test still takes `test_database`, which empties the
    tables after it."""
    workdir = tmp_path_factory.mktemp("presence")
    redis = RedisServer(workdir)
    redis.start()
    try:
        servers = start_pair(base_env(database_url, workdir / "data"), workdir, redis.url)
        try:
            yield servers
        finally:
            stop_servers(servers)
    finally:
        redis.kill()


def online_ids(joined: Json) -> set[str]:
    return {user["id"] for user in joined["online"]}


def presence_of(sock: Socket, room_id: str, user: User) -> list[str]:
    return [f["status"] for f in sock.events(room_id, ("presence",)) if f["user"]["id"] == user.id]


async def members_online(http: httpx.AsyncClient, room_id: str, who: User) -> dict[str, bool]:
    response = await http.get(f"{API}/rooms/{room_id}/members", headers=who.headers)
    assert response.status_code == 200, response.text
    return {m["user"]["id"]: m["online"] for m in response.json()["items"]}


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 5.0) -> None:
    """Poll an async predicate until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def refused_code(server: ServerProcess, user: User) -> int | None:
    """Open a socket expecting a refusal; the close code it got (None if it was let in)."""
    url = server.url.replace("http://", "ws://", 1) + "/ws"
    async with websockets.connect(url, additional_headers=user.headers, open_timeout=10) as ws:
        try:
            first = await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed:
            return ws.close_code
        assert '"hello"' in str(first), first
        return None


async def test_presence_and_online_list_are_per_user_across_servers(
    shared_pair: list[ServerProcess], test_database: str, sockets: Sockets
) -> None:
    one, two = shared_pair
    async with rest(one, two) as (http1, http2):
        alice = await new_user(http1, "alice")
        bob = await new_user(http2, "bob")
        room = await new_room(http1, alice)
        a1 = await sockets.open(one, alice, "alice@1")
        assert online_ids(await a1.join(room)) == {alice.id}

        # Bob joins on the other server: he sees alice online, and she sees him come.
        b2 = await sockets.open(two, bob, "bob@2")
        assert online_ids(await b2.join(room)) == {alice.id, bob.id}
        await a1.expect("presence", room_id=room, status="online", where=_about(bob))
        assert (await members_online(http2, room, bob))[alice.id] is True
        assert (await members_online(http1, room, alice))[bob.id] is True

        # A second tab of bob's, on server 1, is not news to anyone.
        b1 = await sockets.open(one, bob, "bob@1")
        await b1.join(room)
        await b2.close()  # and his first tab going away is not either: he is still on 1
        await asyncio.sleep(1.0)  # room for a wrong presence event to arrive
        await a1.ping()
        assert presence_of(a1, room, bob) == ["online"], a1.events(room, ("presence",))
        assert (await members_online(http2, room, alice))[bob.id] is True

        # His last socket closes: offline, once, everywhere.
        await b1.close()
        await a1.expect("presence", room_id=room, status="offline", where=_about(bob))
        await eventually(
            lambda: _is_offline(http2, room, alice, bob), "bob offline in server 2's list"
        )
        a2 = await sockets.open(two, alice, "alice@2")
        assert online_ids(await a2.join(room)) == {alice.id}


async def test_connection_cap_counts_sockets_on_every_server(
    shared_pair: list[ServerProcess], test_database: str, sockets: Sockets
) -> None:
    one, two = shared_pair
    async with rest(one, two) as (http1, _):
        carol = await new_user(http1, "carol")
        opened = [
            await sockets.open(one, carol, "carol@1a"),
            await sockets.open(two, carol, "carol@2a"),
            await sockets.open(one, carol, "carol@1b"),
        ]
        assert await refused_code(two, carol) == 4429
        assert await refused_code(one, carol) == 4429
        await opened[1].close()

        async def let_in() -> bool:
            code = await refused_code(one, carol)
            assert code in (None, 4429), code
            return code is None

        await eventually(let_in, "a socket freed on server 2 makes room on server 1")


async def test_kill_9_of_a_server_leaves_the_other_serving_and_its_users_offline(
    pair: list[ServerProcess], sockets: Sockets
) -> None:
    one, two = pair
    async with rest(one, two) as (http1, _):
        alice = await new_user(http1, "alice")
        dave = await new_user(http1, "dave")
        room = await new_room(http1, alice)
        a1 = await sockets.open(one, alice, "alice@1")
        await a1.join(room)
        on_two = [await sockets.open(two, dave, f"dave@2{n}") for n in range(CAP)]
        await on_two[0].join(room)
        await a1.expect("presence", room_id=room, status="online", where=_about(dave))
        assert await refused_code(one, dave) == 4429  # his sockets on 2 count on 1

        assert two.process is not None
        two.process.send_signal(signal.SIGKILL)
        two.process.wait(10)
        killed_at = time.monotonic()

        # Server 1 serves on, and after the TTL dave is offline there: event and list.
        ack = await a1.request(send_frame(room, "still here"), "ack")
        assert ack["message"]["seq"] >= 1
        await a1.expect(
            "presence",
            room_id=room,
            status="offline",
            where=_about(dave),
            within=OFFLINE_WITHIN_S,
        )
        assert time.monotonic() - killed_at >= PRESENCE_TTL_S / 2, "offline before any expiry"
        assert (await members_online(http1, room, alice))[dave.id] is False
        # The dead server's sockets no longer count against dave's cap.
        back = [await sockets.open(one, dave, f"dave@1{n}") for n in range(CAP)]
        assert online_ids(await back[0].join(room)) == {alice.id, dave.id}
        await a1.expect("presence", room_id=room, status="online", where=_about(dave))
        assert (await readyz(one))[0] == 200


async def test_typing_throttle_is_shared_by_every_server(
    shared_pair: list[ServerProcess], test_database: str, sockets: Sockets
) -> None:
    one, two = shared_pair
    async with rest(one, two) as (http1, _):
        alice = await new_user(http1, "alice")
        bob = await new_user(http1, "bob")
        room = await new_room(http1, alice)
        tabs = [
            await sockets.open(one, alice, "alice@1"),
            await sockets.open(two, alice, "alice@2"),
        ]
        watcher = await sockets.open(one, bob, "bob@1")
        for sock in (*tabs, watcher):
            await sock.join(room)
        started = time.monotonic()
        for tab in tabs:  # both tabs type at once: one `typing` per second per room, not two
            await tab.send({"type": "typing", "room_id": room})
        await watcher.expect("typing", room_id=room)
        for tab in tabs:
            await tab.ping()  # each server has handled its tab's frame
        await asyncio.sleep(0.3)
        await watcher.ping()
        if time.monotonic() - started < 0.9:  # still inside the first second
            assert len(watcher.events(room, ("typing",))) == 1, watcher.events(room, ("typing",))
        await asyncio.sleep(max(0.0, started + 1.1 - time.monotonic()))
        await tabs[1].send({"type": "typing", "room_id": room})
        await watcher.expect("typing", room_id=room)  # the next second allows one again


async def test_presence_is_recorded_again_after_a_redis_restart(
    pair: list[ServerProcess], own_redis: RedisServer, sockets: Sockets
) -> None:
    one, two = pair
    async with rest(one, two) as (http1, _):
        alice = await new_user(http1, "alice")
        bob = await new_user(http1, "bob")
        room = await new_room(http1, alice)
        a1 = await sockets.open(one, alice, "alice@1")
        await a1.join(room)

        own_redis.kill()  # it keeps nothing: everything recorded there is gone
        own_redis.start()
        for server in pair:
            await wait_readyz(server, 200, within=15)

        b2 = await sockets.open(two, bob, "bob@2")

        async def alice_listed() -> bool:
            joined = await b2.join(room)
            await b2.request({"type": "leave", "room_id": room}, "left")
            return alice.id in online_ids(joined)

        await eventually(alice_listed, "server 1 records alice again", within=10)
        assert (await members_online(http1, room, bob))[alice.id] is True


async def test_a_frozen_redis_turns_readiness_red_and_local_chat_goes_on(
    server_env: dict[str, str], tmp_path: Path, own_redis: RedisServer, sockets: Sockets
) -> None:
    (server,) = start_servers(scaled_env(server_env, own_redis.url), tmp_path, 1)
    try:
        async with rest(server) as (http,):
            alice = await new_user(http, "alice")
            bob = await new_user(http, "bob")
            room = await new_room(http, alice)
            a = await sockets.open(server, alice)
            b = await sockets.open(server, bob)
            for sock in (a, b):
                await sock.join(room)

            assert own_redis.process is not None
            own_redis.process.send_signal(signal.SIGSTOP)  # alive to TCP, silent to Redis
            _, body = await wait_readyz(server, 503, within=15)
            assert body["checks"]["broker"] == "unavailable", body

            # Sends are acked (rate limits and presence fall back to this process) and
            # delivered here.
            ack = await a.request(send_frame(room, "while redis is frozen"), "ack", within=15)
            seq = ack["message"]["seq"]
            await b.expect("message.new", room_id=room, where=lambda f: f["message"]["seq"] == seq)

            own_redis.process.send_signal(signal.SIGCONT)
            await wait_readyz(server, 200, within=15)
    finally:
        stop_servers([server])


def _about(user: User) -> Callable[[Json], bool]:
    return lambda frame: frame["user"]["id"] == user.id


async def _is_offline(http: httpx.AsyncClient, room_id: str, who: User, user: User) -> bool:
    return (await members_online(http, room_id, who))[user.id] is False
