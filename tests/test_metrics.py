"""`GET /metrics`: real traffic against a real server moves each counter by exactly its amount.

Every figure is read back from the Prometheus text the server serves, parsed with
prometheus_client's own parser, as a scraper would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from chat_service.metrics import Metrics
from chat_service.realtime.connection import Connection, Outbound
from chat_service.schemas import UserSummary
from tests.conftest import AppFactory, LiveServer, LiveServerFactory, client_for
from tests.helpers import API, PASSWORD, bearer, signup

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]
TIMEOUT_S = 5.0


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Counters:
    """What moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before = before
        self.after = after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


async def wait_for_gauge(http: httpx.AsyncClient, name: str, expected: float) -> Samples:
    """Scrape until gauge `name` reads `expected` (a socket's end is noticed asynchronously)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        samples = await scrape(http)
        if value(samples, name) == expected:
            return samples
        assert time.monotonic() < deadline, f"{name} = {value(samples, name)}, not {expected}"
        await asyncio.sleep(0.05)


# --- a minimal protocol client ------------------------------------------------------------


async def recv(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
    assert isinstance(raw, str)
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def recv_type(ws: ClientConnection, frame_type: str, seen: list[str]) -> dict[str, Any]:
    """The next frame of `frame_type`, skipping live events (presence, other messages); every
    frame read is noted in `seen`."""
    while True:
        frame = await recv(ws)
        seen.append(frame["type"])
        if frame["type"] == frame_type:
            return frame
        assert frame["type"] in ("presence", "typing", "message.new"), frame


@asynccontextmanager
async def ws_open(
    live: LiveServer, path: str = "/ws", **options: Any
) -> AsyncIterator[ClientConnection]:
    async with connect(live.ws + path, open_timeout=TIMEOUT_S, **options) as ws:
        yield ws


async def refused_with(live: LiveServer, path: str = "/ws", **options: Any) -> int:
    """Open a socket the server refuses; the close code it sent."""
    async with ws_open(live, path, **options) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


# --- the test -------------------------------------------------------------------------------


async def test_real_traffic_moves_every_counter_by_its_amount(
    live_server_factory: LiveServerFactory,
) -> None:
    live = await live_server_factory(
        login_account_limit="2/15 minutes",
        message_rate_per_s=1,
        message_burst=3,  # 3 sends per 3 s: the 4th in a row is refused
    )
    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        start = await scrape(http)

        # HTTP: signups, failed logins up to the limit, bad bearers, a refresh token reused.
        alice = await signup(http, "alice_m")
        bob = await signup(http, "bob_m")
        carol = await signup(http, "carol_m")
        wrong = {"username": "alice_m", "password": "not the password"}
        for _ in range(2):
            assert (await http.post(f"{API}/auth/login", json=wrong)).status_code == 401
        assert (await http.post(f"{API}/auth/login", json=wrong)).status_code == 429
        me = f"{API}/users/me"
        assert (await http.get(me, headers=bearer("not-a-jwt"))).status_code == 401
        assert (await http.get(me)).status_code == 401
        spent = {"refresh_token": carol["refresh_token"]}
        assert (await http.post(f"{API}/auth/refresh", json=spent)).status_code == 200
        assert (await http.post(f"{API}/auth/refresh", json=spent)).status_code == 401
        relogin = {"username": "carol_m", "password": PASSWORD}
        carol = (await http.post(f"{API}/auth/login", json=relogin)).json()

        alice_h, bob_h = bearer(alice["access_token"]), bearer(bob["access_token"])
        created = await http.post(f"{API}/rooms", json={"name": "metrics"}, headers=alice_h)
        assert created.status_code == 201, created.text
        room_id = created.json()["id"]
        assert (await http.post(f"{API}/rooms/{room_id}/join", headers=bob_h)).status_code == 200
        assert (await http.get(f"{API}/rooms/{room_id}", headers=alice_h)).status_code == 200
        assert (await http.get(f"/no/such/{room_id}")).status_code == 404

        after_http = await scrape(http)
        moved = Counters(start, after_http)
        requests = "chat_http_requests_total"
        assert moved(requests, method="POST", route=f"{API}/auth/signup", status="201") == 3
        assert moved(requests, method="POST", route=f"{API}/auth/login", status="401") == 2
        assert moved(requests, method="POST", route=f"{API}/auth/login", status="429") == 1
        assert moved(requests, method="POST", route=f"{API}/auth/login", status="200") == 1
        assert moved(requests, method="GET", route=f"{API}/users/me", status="401") == 2
        assert moved(requests, method="POST", route=f"{API}/auth/refresh", status="401") == 1
        assert moved(requests, method="GET", route=f"{API}/rooms/{{room_id}}", status="200") == 1
        assert moved(requests, method="GET", route="unmatched", status="404") == 1
        assert moved(requests, method="GET", route="/metrics", status="200") == 1  # `start`
        durations = "chat_http_request_duration_seconds_count"
        assert moved(durations, method="POST", route=f"{API}/auth/signup", status="201") == 3
        labels = {label for (_, sample_labels) in after_http for label in sample_labels}
        assert not any(room_id in label_value for _, label_value in labels), "raw path in a label"

        # WebSocket: alice by header, bob by ticket; 3 sends, a 4th refused, one REST send.
        ticket = (await http.post(f"{API}/auth/ws-ticket", headers=bob_h)).json()["ticket"]
        seen: dict[str, list[str]] = {"alice": [], "bob": [], "carol": []}
        async with (
            ws_open(live, additional_headers=alice_h) as alice_ws,
            ws_open(live, f"/ws?ticket={ticket}") as bob_ws,
        ):
            for ws, name in ((alice_ws, "alice"), (bob_ws, "bob")):
                await recv_type(ws, "hello", seen[name])
                await ws.send(json.dumps({"type": "join", "room_id": room_id, "limit": 1}))
                await recv_type(ws, "joined", seen[name])
            assert value(await scrape(http), "chat_ws_connections") == 2
            for _ in range(2):  # 1 per second per room: the second is dropped
                await alice_ws.send(json.dumps({"type": "typing", "room_id": room_id}))
            for n in range(4):
                send = {"type": "message.send", "room_id": room_id, "body": f"m{n}"}
                await alice_ws.send(json.dumps({**send, "client_id": f"c{n}"}))
                if n < 3:
                    await recv_type(alice_ws, "ack", seen["alice"])
                else:
                    refused = await recv_type(alice_ws, "error", seen["alice"])
                    assert refused["code"] == "rate_limited", refused
            posted = await http.post(
                f"{API}/rooms/{room_id}/messages", json={"body": "rest"}, headers=bob_h
            )
            assert posted.status_code == 201, posted.text
            for ws, name in ((alice_ws, "alice"), (bob_ws, "bob")):
                while seen[name].count("message.new") < 4:
                    await recv_type(ws, "message.new", seen[name])
        await wait_for_gauge(http, "chat_ws_connections", 0)

        # Refused handshakes: missing, invalid and URL credentials; a foreign origin.
        assert await refused_with(live) == 4401
        assert await refused_with(live, additional_headers=bearer("not-a-jwt")) == 4401
        assert await refused_with(live, f"/ws?access_token={alice['access_token']}") == 4401
        evil = Origin("http://evil.example")
        assert await refused_with(live, additional_headers=alice_h, origin=evil) == 4403

        # carol alone, in no room: exactly the frames she reads are the frames written.
        before_carol = await scrape(http)
        protocols = [Subprotocol("chat.v1"), Subprotocol(f"bearer.{carol['access_token']}")]
        async with ws_open(live, subprotocols=protocols) as carol_ws:
            await recv_type(carol_ws, "hello", seen["carol"])
            for _ in range(5):
                await carol_ws.send(json.dumps({"type": "ping"}))
                await recv_type(carol_ws, "pong", seen["carol"])
            await carol_ws.send("{not json")
            await recv_type(carol_ws, "error", seen["carol"])
            await carol_ws.send(json.dumps({"type": "no.such.type"}))
            await recv_type(carol_ws, "error", seen["carol"])
        end = await wait_for_gauge(http, "chat_ws_connections", 0)

    assert len(seen["carol"]) == 8
    assert Counters(before_carol, end)("chat_ws_frames_sent_total") == 8
    # Each reply was awaited before the next request: nothing to coalesce, a write each.
    assert Counters(before_carol, end)("chat_ws_socket_writes_total") == 8

    moved = Counters(start, end)
    assert moved("chat_ws_connections_opened_total") == 3
    assert moved("chat_ws_connections_closed_total", code="1000") == 3
    assert moved("chat_ws_handshake_refusals_total", code="4401") == 3
    assert moved("chat_ws_handshake_refusals_total", code="4403") == 1
    assert moved("chat_ws_frames_received_total", type="join") == 2
    assert moved("chat_ws_frames_received_total", type="message.send") == 4
    assert moved("chat_ws_frames_received_total", type="ping") == 5
    assert moved("chat_ws_frames_received_total", type="typing") == 2
    assert moved("chat_ws_error_frames_total", code="rate_limited") == 1
    assert moved("chat_ws_error_frames_total", code="invalid_json") == 1
    assert moved("chat_ws_error_frames_total", code="unknown_type") == 1
    # Every frame a client read was written once (presence may add frames nobody waited for).
    assert moved("chat_ws_frames_sent_total") >= sum(len(frames) for frames in seen.values())
    assert moved("chat_messages_stored_total") == 4
    assert moved("chat_events_published_total", type="message.new") == 4
    assert moved("chat_fanout_latency_seconds_count", event="message.new") == 4
    assert 0 <= moved("chat_fanout_latency_seconds_sum", event="message.new") < 4 * 60
    assert moved("chat_rate_limited_total", limit="login-account") == 1
    assert moved("chat_rate_limited_total", limit="messages") == 1
    assert moved("chat_rate_limited_total", limit="typing") == 1
    failures = "chat_auth_failures_total"
    assert moved(failures, reason="invalid_credentials", transport="http") == 2
    assert moved(failures, reason="invalid_token", transport="http") == 1
    assert moved(failures, reason="not_authenticated", transport="http") == 1
    assert moved(failures, reason="token_reused", transport="http") == 1
    assert moved(failures, reason="invalid_token", transport="ws") == 1
    assert moved(failures, reason="not_authenticated", transport="ws") == 2
    assert value(end, "chat_ws_connections") == 0
    assert value(end, "chat_broker_up") == 1
    assert value(end, "chat_asyncio_tasks") > 0
    assert value(end, "process_resident_memory_bytes") > 0
    assert value(end, "process_open_fds") > 0


async def test_each_app_counts_only_its_own_traffic(app_factory: AppFactory) -> None:
    first, second = await app_factory(), await app_factory()
    async with client_for(first) as one, client_for(second) as two:
        for _ in range(3):
            assert (await one.get("/healthz")).status_code == 200
        healthz = {"method": "GET", "route": "/healthz", "status": "200"}
        assert value(await scrape(one), "chat_http_requests_total", **healthz) == 3
        assert value(await scrape(two), "chat_http_requests_total", **healthz) == 0


async def test_metrics_can_be_turned_off(app_factory: AppFactory) -> None:
    app = await app_factory(metrics_enabled=False)
    async with client_for(app) as client:
        response = await client.get("/metrics")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


class FakeWebSocket:
    """Stands in for the socket: what a full queue does is decided before anything is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: list[int] = []
        self.scope: dict[str, Any] = {}  # offers no FrameWriter: frames go through send_text

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append(code)


async def test_queue_drops_and_slow_consumer_closes_are_counted() -> None:
    metrics = Metrics()
    websocket = FakeWebSocket()
    connection = Connection(
        websocket,  # type: ignore[arg-type]
        user=UserSummary(id="u1", username="u1", display_name="u1"),
        session_id="s1",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        max_frames=2,
        max_bytes=1 << 20,
        metrics=metrics,
    )
    connection.offer(Outbound('{"type":"typing"}', droppable=True))
    connection.offer(Outbound('{"type":"message.new","n":1}'))
    connection.offer(Outbound('{"type":"presence"}', droppable=True))  # full: dropped
    connection.offer(Outbound('{"type":"message.new","n":2}'))  # evicts the typing frame
    connection.offer(Outbound('{"type":"message.new","n":3}'))  # nothing to evict: 4408
    await asyncio.wait_for(connection.run_writer(), TIMEOUT_S)
    samples = parse(metrics.render().decode())
    assert value(samples, "chat_ws_frames_dropped_total") == 2
    assert value(samples, "chat_ws_slow_consumer_closes_total") == 1
    assert value(samples, "chat_ws_frames_sent_total") == len(websocket.sent) == 0
    assert websocket.closed == [4408]
    assert connection.close_code == 4408


async def test_a_burst_reaches_a_member_in_fewer_socket_writes_than_frames(
    live_server_factory: LiveServerFactory,
) -> None:
    """Frames queued while a connection's writer was busy go out together, in seq order."""
    live = await live_server_factory(message_rate_per_s=1000, message_burst=1000)
    senders, per_sender = 5, 20
    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        users = [await signup(http, f"burst_{n}") for n in range(senders + 1)]
        headers = [bearer(user["access_token"]) for user in users]
        created = await http.post(f"{API}/rooms", json={"name": "burst"}, headers=headers[0])
        room_id = created.json()["id"]
        for member in headers[1:]:
            joined = await http.post(f"{API}/rooms/{room_id}/join", headers=member)
            assert joined.status_code == 200, joined.text
        async with AsyncExitStack() as stack:
            sockets = [
                await stack.enter_async_context(ws_open(live, additional_headers=h))
                for h in headers
            ]
            scratch: list[str] = []
            for ws in sockets:
                await recv_type(ws, "hello", scratch)
            listener, talkers = sockets[0], sockets[1:]
            await listener.send(json.dumps({"type": "join", "room_id": room_id, "limit": 1}))
            await recv_type(listener, "joined", scratch)
            online = await recv_type(listener, "presence", scratch)  # its own, announced later
            assert online["status"] == "online", online
            before = await scrape(http)

            async def talk(ws: ClientConnection, n: int) -> None:
                for i in range(per_sender):  # all at once: the acks are read afterwards
                    send = {"type": "message.send", "room_id": room_id, "body": f"{n}.{i}"}
                    await ws.send(json.dumps({**send, "client_id": f"b{n}.{i}"}))
                for _ in range(per_sender):
                    await recv_type(ws, "ack", scratch)

            async def listen() -> list[int]:
                seqs: list[int] = []
                while len(seqs) < senders * per_sender:
                    frame = await recv(listener)
                    assert frame["type"] == "message.new", frame
                    seqs.append(frame["message"]["seq"])
                return seqs

            *_, seqs = await asyncio.gather(
                *(talk(ws, n) for n, ws in enumerate(talkers)), listen()
            )
            after = await scrape(http)

    assert seqs == list(range(1, senders * per_sender + 1)), "a frame lost or out of order"
    moved = Counters(before, after)
    frames, writes = moved("chat_ws_frames_sent_total"), moved("chat_ws_socket_writes_total")
    assert frames == 2 * senders * per_sender, "an ack and a message.new per send"
    # Concurrent sends share commits, so their events reach the listener's queue together.
    assert 0 < writes < frames, (writes, frames)
