"""WebSocket connection life over real sockets: slow consumers, churn, dead peers, shutdown,
resume across a restart, log secrecy, and the hub's per-room ordering.

Everything that matters here happens in the kernel and in uvicorn, so these tests use real
servers: `live_server_factory` (uvicorn in this process, so the hub can be inspected) and
`ServerProcess` (a real `chat-service serve`, for signals, exit codes and logs). A stalled
reader is a raw socket with a small receive buffer that stops reading (see
shared/MEASURING.md: a `websockets` client that stops calling recv() keeps reading anyway).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from chat_service.domain.events import Event
from chat_service.realtime.connection import (
    CLOSE_TIMEOUT_S,
    FRAME_WRITER,
    STUCK_CLOSE_TIMEOUT_S,
    Connection,
    Outbound,
)
from chat_service.realtime.hub import REORDER_WAIT_S, Hub
from chat_service.schemas import UserSummary
from chat_service.server import ABORT_STUCK_AFTER_S
from tests.conftest import LiveServer, LiveServerFactory
from tests.frame_schemas import validate_server_frame
from tests.helpers import API, ServerProcess, bearer, free_port, signup
from tests.test_server_process import assert_not_logged, json_log, stop_cleanly

pytestmark = pytest.mark.backend_independent(suite="postgres")  # see tests/conftest.py

log = logging.getLogger(__name__)

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BIG_BODY_CHARS = 16000  # message_max_chars is raised for this: fewer commits, same bytes
MANY_SIGNUPS = "1000/hour"

Json = dict[str, Any]


# --- accounts and REST ------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: str
    username: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


async def new_user(http: httpx.AsyncClient, prefix: str) -> User:
    body = await signup(http, f"{prefix}_{secrets.token_hex(3)}")
    return User(body["user"]["id"], body["user"]["username"], body["access_token"])


async def new_room(http: httpx.AsyncClient, owner: User, *members: User) -> str:
    response = await http.post(
        f"{API}/rooms", json={"name": "lifecycle", "visibility": "public"}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    room_id = str(response.json()["id"])
    for member in members:
        joined = await http.post(f"{API}/rooms/{room_id}/join", headers=member.headers)
        assert joined.status_code == 200, joined.text
    return room_id


async def post_message(http: httpx.AsyncClient, room_id: str, who: User, body: str) -> Json:
    response = await http.post(
        f"{API}/rooms/{room_id}/messages", json={"body": body}, headers=who.headers
    )
    assert response.status_code == 201, response.text
    message: Json = response.json()
    return message


# --- websockets client helpers ----------------------------------------------------------------


def ws_connect(base: str, user: User, path: str = "/ws", **options: Any) -> Any:
    return websockets.connect(
        f"{base}{path}",
        additional_headers=user.headers,
        open_timeout=10,
        close_timeout=3,
        **options,
    )


async def next_frame(
    ws: ClientConnection, frame_type: str, wait_s: float = 10, **match: Any
) -> Json:
    """The next frame of `frame_type` (with the given field values); others are skipped."""
    deadline = time.monotonic() + wait_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {frame_type} frame ({match}) within {wait_s} s")
        frame: Json = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        validate_server_frame(frame)
        if frame["type"] == frame_type and all(frame.get(k) == v for k, v in match.items()):
            return frame
        assert frame["type"] != "error", frame


async def join(ws: ClientConnection, room_id: str, **fields: Any) -> Json:
    ref = secrets.token_hex(4)
    await ws.send(json.dumps({"type": "join", "room_id": room_id, "ref": ref, **fields}))
    return await next_frame(ws, "joined", ref=ref)


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://", 1)


@dataclass
class Recorder:
    """Reads a websockets connection to its end: every frame, then the close code."""

    ws: ClientConnection
    frames: list[Json] = field(default_factory=list)
    close_code: int | None = None
    closed_at: float | None = None  # time.monotonic() when the connection ended
    task: asyncio.Task[None] | None = None

    def start(self) -> Recorder:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                validate_server_frame(self.frames[-1])
        except websockets.exceptions.ConnectionClosed:
            pass
        self.closed_at = time.monotonic()
        self.close_code = self.ws.close_code

    async def wait_closed(self, wait_s: float) -> int | None:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), wait_s)
        return self.close_code

    def of_type(self, frame_type: str) -> list[Json]:
        return [f for f in self.frames if f["type"] == frame_type]


# --- a raw WebSocket client: reads only when asked ----------------------------------------------


class PeerClosed(Exception):
    """The server sent a close frame (`code`), or the TCP stream ended (`code` None)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason!r}")
        self.code = code
        self.reason = reason


class RawWebSocket:
    """A hand-made RFC 6455 client on a non-blocking socket.

    Nothing reads the socket unless a test awaits a frame, so a reader that stops calling
    recv_frame() stalls at the kernel: its receive window closes and the server's send
    buffer fills, which is what a slow phone on a bad network looks like to the server.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(
        cls, port: int, path: str, headers: dict[str, str], *, rcvbuf: int | None = None
    ) -> RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window scale is negotiated small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        raw = cls(sock)
        await asyncio.wait_for(raw.loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        await raw.loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in raw.buffer:
            await raw._read_more(5)
        head, _, rest = bytes(raw.buffer).partition(b"\r\n\r\n")
        raw.buffer = bytearray(rest)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        assert status_line.split(" ")[1] == "101", head
        received = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines)
        }
        expected = base64.b64encode(
            hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()
        ).decode()
        assert received.get("sec-websocket-accept") == expected, head
        return raw

    async def _read_more(self, wait_s: float) -> None:
        chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), wait_s)
        if not chunk:
            raise PeerClosed(None, "end of stream")
        self.buffer += chunk

    async def _take(self, n: int, wait_s: float) -> bytes:
        while len(self.buffer) < n:
            await self._read_more(wait_s)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def recv_frame(self, wait_s: float = 10) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; server frames are unmasked and unfragmented."""
        first, second = await self._take(2, wait_s)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self._take(2, wait_s), "big")
        elif length == 127:
            length = int.from_bytes(await self._take(8, wait_s), "big")
        mask = await self._take(4, wait_s) if second & 0x80 else None
        payload = await self._take(length, wait_s)
        if mask is not None:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, payload

    async def recv_json(self, wait_s: float = 10) -> Json:
        """The next text frame, parsed; control frames are skipped (pings are never answered)."""
        while True:
            opcode, payload = await self.recv_frame(wait_s)
            if opcode == 0x1:
                frame: Json = json.loads(payload)
                return frame
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise PeerClosed(code, payload[2:].decode(errors="replace"))

    async def send_json(self, frame: Json) -> None:
        payload = json.dumps(frame).encode()
        mask = os.urandom(4)
        header = bytearray([0x81])  # FIN + text
        if len(payload) < 126:
            header.append(0x80 | len(payload))
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.loop.sock_sendall(self.sock, bytes(header) + mask + masked)

    def close(self) -> None:
        self.sock.close()


# --- polling ------------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool], wait_s: float, what: Callable[[], str], step: float = 0.02
) -> float:
    """Poll `condition`; return the seconds it took, or fail saying `what()` was seen."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > wait_s:
            raise AssertionError(f"not within {wait_s} s: {what()}")
        await asyncio.sleep(step)
    return time.monotonic() - started


def hub_of(live: LiveServer) -> Hub:
    hub: Hub = live.app.state.hub
    return hub


# --- 1. slow consumer ---------------------------------------------------------------------------


async def test_stalled_reader_is_closed_4408_and_never_slows_the_room(
    live_server_factory: LiveServerFactory,
) -> None:
    live = await live_server_factory(
        outbound_queue_frames=50,
        outbound_queue_bytes=64 * 1024,
        message_max_chars=BIG_BODY_CHARS,
        message_rate_per_s=10000,
        message_burst=10000,
        signup_ip_limit=MANY_SIGNUPS,
    )
    hub = hub_of(live)
    total = 400  # ~6.5 MB of message frames: more than kernel buffers + queue can hide
    window = 8  # sends in flight: keeps latency about delivery, not a backlog we made

    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        sender = await new_user(http, "sender")
        healthy_user = await new_user(http, "healthy")
        stalled_user = await new_user(http, "stalled")
        room_id = await new_room(http, sender, healthy_user, stalled_user)

    stalled = await RawWebSocket.connect(
        live.port, "/ws", {"Authorization": f"Bearer {stalled_user.token}"}, rcvbuf=4096
    )
    try:
        assert (await stalled.recv_json())["type"] == "hello"
        await stalled.send_json({"type": "join", "room_id": room_id, "ref": "j", "limit": 1})
        while (await stalled.recv_json())["type"] != "joined":
            pass
        # From here on the raw socket is never read until the server has given up on it.

        async with (
            ws_connect(live.ws, healthy_user) as healthy,
            ws_connect(live.ws, sender) as sending,
        ):
            await next_frame(healthy, "hello")
            await join(healthy, room_id, limit=1)
            await next_frame(sending, "hello")
            assert hub.stats()["connections"] == 3
            assert hub.stats()["subscriptions"] == 2
            slow = next(c for c in hub.all_connections() if c.user_id == stalled_user.id)

            latencies: list[float] = []
            received: list[int] = []
            acks: list[Json] = []
            in_flight = asyncio.Semaphore(window)

            async def read_healthy() -> None:
                while len(received) < total:
                    frame = json.loads(await asyncio.wait_for(healthy.recv(), 20))
                    if frame["type"] == "message.new":
                        now = time.perf_counter_ns()
                        received.append(frame["message"]["change_seq"])
                        sent_at = int(frame["message"]["body"].split(":", 1)[0])
                        latencies.append((now - sent_at) / 1e9)

            async def read_acks() -> None:
                while len(acks) < total:
                    frame = json.loads(await asyncio.wait_for(sending.recv(), 20))
                    assert frame["type"] == "ack", frame
                    acks.append(frame)
                    in_flight.release()

            async def send_all() -> None:
                for n in range(total):
                    await in_flight.acquire()
                    stamp = f"{time.perf_counter_ns()}:"
                    body = stamp + "x" * (BIG_BODY_CHARS - len(stamp))
                    frame = {"type": "message.send", "room_id": room_id, "body": body}
                    await sending.send(json.dumps({**frame, "client_id": f"c{n}", "ref": n}))

            marks: dict[str, float] = {}

            async def watch_slow() -> None:
                """When the server gave up on the stalled reader, and when it left the hub."""
                await wait_until(lambda: slow.is_closing, 60, str, step=0.005)
                marks["4408"] = time.monotonic()
                await wait_until(lambda: hub.stats()["connections"] <= 2, 60, str, step=0.005)
                marks["left"] = time.monotonic()

            watcher = asyncio.create_task(watch_slow())
            started = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(send_all(), read_acks(), read_healthy()), 60)
            finally:
                sending_took = time.monotonic() - started
            assert received == list(range(1, total + 1)), "the healthy reader missed messages"
            assert [a["message"]["change_seq"] for a in acks] == list(range(1, total + 1))
            p99 = sorted(latencies)[int(total * 0.99)]
            assert max(latencies) < 2.0, (
                f"healthy reader's send->receive latency: max {max(latencies):.3f} s, "
                f"p99 {p99:.3f} s"
            )
            # The queue overflowed: the stalled connection was marked for a 4408 close...
            assert slow.is_closing, "the stalled reader was never closed"
            assert slow.queued == (0, 0), "a 4408 close keeps no frames"
            # ... and it leaves the hub within a few seconds: no subscription, not online.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher, 2 * CLOSE_TIMEOUT_S + 5)
            left_after = marks.get("left", time.monotonic()) - marks["4408"]
            log.info(
                f"slow consumer: {total} x {BIG_BODY_CHARS} chars sent in {sending_took:.1f} s,"
                f" healthy p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
                f"4408 at {marks['4408'] - started:.1f} s; left the hub {left_after:.1f} s later"
            )
            assert hub.stats()["connections"] == 2, hub.stats()
            assert hub.stats()["subscriptions"] == 1, hub.stats()
            assert hub.online(room_id) == [summary(healthy_user)]
            # Checked last, so that the drain below still runs and reports what it sees.
            problems: list[str] = []
            if left_after > CLOSE_TIMEOUT_S + 2:
                problems.append(
                    f"a connection closed 4408 stayed subscribed and online for "
                    f"{left_after:.1f} s after the server gave up on it"
                )
            # The server must not keep the stalled socket, and the megabytes buffered for it,
            # once the connection is gone: uvicorn's own count of open sockets says so.
            # The handler gives a close that cannot go out STUCK_CLOSE_TIMEOUT_S, then the
            # transport is aborted ABORT_STUCK_AFTER_S later (chat_service/server.py).
            connections = live.server.server_state.connections
            released_by = marks["left"] + STUCK_CLOSE_TIMEOUT_S + ABORT_STUCK_AFTER_S + 2
            with contextlib.suppress(AssertionError):
                await wait_until(
                    lambda: len(connections) <= 2, max(0.1, released_by - time.monotonic()), str
                )
            if len(connections) > 2:
                problems.append(
                    f"{len(connections) - 2} stalled socket(s) still open in uvicorn "
                    f"{time.monotonic() - marks['left']:.1f} s after leaving the hub: a "
                    "4408 peer that never reads pins its send buffers forever"
                )

        # Read what the server managed to write: a gapless prefix, then (maybe) 4408.
        seen: list[int] = []
        close_code: int | None = None
        with contextlib.suppress(PeerClosed, ConnectionError, TimeoutError):
            while True:
                try:
                    frame = await stalled.recv_json(wait_s=5)
                except PeerClosed as closed:
                    close_code = closed.code
                    break
                if frame["type"] == "message.new":
                    seen.append(frame["message"]["change_seq"])
        assert seen == list(range(1, len(seen) + 1)), "the stalled reader got a hole"
        assert len(seen) < total, "the stalled reader was not stalled: the test proves nothing"
        assert close_code in (None, 4408), close_code
        log.info(f"stalled reader drained {len(seen)} messages, then close code {close_code}")
        assert not problems, "; ".join(problems)
    finally:
        stalled.close()


def summary(user: User) -> UserSummary:
    return UserSummary(id=user.id, username=user.username, display_name=user.username)


class FakeWebSocket:
    def __init__(self, frame_writer: RecordingFrameWriter | None = None) -> None:
        self.sent: list[str] = []
        self.closed: list[tuple[int, str]] = []
        self.scope = {"extensions": {FRAME_WRITER: frame_writer}} if frame_writer else {}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append((code, reason or ""))


class RecordingFrameWriter:
    """Takes the place of the server's socket: keeps each write as it would hit the wire;
    `writable` stands for the transport being under its high-water mark."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.writable = asyncio.Event()
        self.writable.set()

    def frames_open(self) -> bool:
        return True

    def writable_now(self) -> bool:
        return self.writable.is_set()

    async def wait_writable(self) -> None:
        await self.writable.wait()

    def write_frames(self, data: bytes) -> None:
        self.writes.append(data)


def parse_server_frames(data: bytes) -> list[Frame]:
    """Read frames back with the websockets library's own parser, as a client would."""
    reader = StreamReader()
    reader.feed_data(data)
    parsed: list[Frame] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        with pytest.raises(StopIteration) as done:
            next(parser)
        parsed.append(done.value.value)
    return parsed


async def test_queued_frames_go_out_in_one_write_that_a_client_parses_back() -> None:
    writer = RecordingFrameWriter()
    websocket = FakeWebSocket(writer)
    connection = make_connection(websocket, max_frames=10, max_bytes=1 << 20)
    # One payload per header form: 7-bit, 16-bit and 64-bit lengths (RFC 6455 5.2).
    texts = ['{"n":1}', '{"body":"' + "é" * 100 + '"}', '{"body":"' + "x" * 70_000 + '"}']
    for text in texts:
        connection.offer(Outbound(text))
    connection.close(1000, "bye")

    await asyncio.wait_for(connection.run_writer(), 2)

    assert len(writer.writes) == 1, "three queued frames, one socket write"
    parsed = parse_server_frames(writer.writes[0])
    assert [(f.opcode, f.fin, bytes(f.data).decode()) for f in parsed] == [
        (Opcode.TEXT, True, text) for text in texts
    ]
    assert websocket.sent == [], "nothing went through ASGI send"
    assert websocket.closed == [(1000, "bye")], "the close frame still goes through ASGI"


async def test_a_fan_out_burst_is_one_write_per_member_by_the_hub_not_the_writer_tasks() -> None:
    hub = Hub()
    members = [RecordingFrameWriter() for _ in range(3)]
    connections = []
    for n, writer in enumerate(members):
        connection = make_connection(FakeWebSocket(writer), max_frames=100, max_bytes=1 << 20)
        connection.user = UserSummary(id=f"u{n}", username=f"u{n}", display_name=f"u{n}")
        hub.register(connection)
        hub.subscribe(connection, "r")
        hub.finish_join(connection, "r", 0)
        connections.append(connection)
    tasks = [asyncio.create_task(c.run_writer()) for c in connections]
    await asyncio.sleep(0)  # the writers park, waiting for frames
    members[2].writable.clear()  # this member's socket is backed up
    parked = [c._wakeup for c in connections]  # each writer's wait

    for seq in (1, 2, 3):
        hub.dispatch(message_event("r", seq))
    await asyncio.sleep(0)  # one pass of the loop: the hub's flush

    for writer in members[:2]:
        assert len(writer.writes) == 1, "three events, one write"
        parsed = parse_server_frames(writer.writes[0])
        assert [json.loads(f.data)["message"]["seq"] for f in parsed] == [1, 2, 3]
    assert [c._wakeup for c in connections[:2]] == parked[:2], "writer tasks woken"
    assert all(wait is not None and not wait.done() for wait in parked[:2])
    assert members[2].writes == [], "a backed-up socket is left to its writer"
    members[2].writable.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(members[2].writes) == 1
    assert [
        json.loads(f.data)["message"]["seq"] for f in parse_server_frames(members[2].writes[0])
    ] == [1, 2, 3]
    for connection in connections:
        connection.close(1000, "bye")
    await asyncio.wait_for(asyncio.gather(*tasks), 2)


def make_connection(websocket: FakeWebSocket, *, max_frames: int, max_bytes: int) -> Connection:
    return Connection(
        websocket,  # type: ignore[arg-type]
        user=UserSummary(id="u1", username="u1", display_name="u1"),
        session_id="s1",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        max_frames=max_frames,
        max_bytes=max_bytes,
    )


async def test_full_queue_drops_typing_and_presence_first_then_closes_4408() -> None:
    websocket = FakeWebSocket()
    connection = make_connection(websocket, max_frames=4, max_bytes=1 << 20)
    typing = Outbound('{"type":"typing"}', droppable=True)
    presence = Outbound('{"type":"presence"}', droppable=True)
    messages = [Outbound(f'{{"type":"message.new","n":{n}}}') for n in range(6)]

    connection.offer(messages[0])
    connection.offer(typing)
    connection.offer(messages[1])
    connection.offer(presence)
    assert connection.queued[0] == 4
    connection.offer(Outbound('{"type":"typing","late":1}', droppable=True))
    assert connection.dropped_frames == 1, "a droppable frame on a full queue is dropped"
    assert not connection.is_closing

    connection.offer(messages[2])  # evicts typing and presence to make room
    connection.offer(messages[3])
    assert not connection.is_closing
    assert connection.dropped_frames == 3
    assert connection.queued[0] == 4

    connection.offer(messages[4])  # nothing left to drop: too slow
    assert connection.is_closing
    assert connection.close_requested.done()
    assert connection.queued == (0, 0), "a 4408 close discards the queue"
    connection.offer(messages[5])  # ignored once closing
    assert connection.queued == (0, 0)

    await asyncio.wait_for(connection.run_writer(), 2)
    assert websocket.sent == [], "nothing queued before the overflow is sent after it"
    assert [code for code, _ in websocket.closed] == [4408]

    # The byte bound works the same way.
    by_bytes = make_connection(FakeWebSocket(), max_frames=1000, max_bytes=100)
    by_bytes.offer(Outbound("t" * 60, droppable=True))
    by_bytes.offer(Outbound("m" * 60))
    assert not by_bytes.is_closing
    assert by_bytes.queued == (1, 60)
    by_bytes.offer(Outbound("m" * 60))
    assert by_bytes.is_closing


# --- 2. churn -----------------------------------------------------------------------------------


async def test_connection_churn_leaves_no_trace(live_server_factory: LiveServerFactory) -> None:
    # A hundred handshakes at once each need a database connection: a pool that can hold
    # them, or a loaded machine turns some into (correct, but here unwanted) 1013s.
    live = await live_server_factory(
        max_connections_per_user=10000,
        signup_ip_limit=MANY_SIGNUPS,
        db_pool_size=20,
        db_max_overflow=30,
        db_connect_timeout_s=30,
    )
    hub = hub_of(live)
    total, batch = 1500, 100

    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        owner = await new_user(http, "owner")
        users = [await new_user(http, "churn") for _ in range(5)]
        room_id = await new_room(http, owner, *users)

    async with ws_connect(live.ws, owner) as watcher:
        await next_frame(watcher, "hello")
        first = await join(watcher, room_id, limit=1)
        assert [u["id"] for u in first["online"]] == [owner.id]
        baseline_stats = hub.stats()
        await asyncio.sleep(0.1)
        baseline_tasks = len(asyncio.all_tasks())

        async def open_one(user: User) -> ClientConnection:
            ws = await websockets.connect(
                f"{live.ws}/ws", additional_headers=user.headers, open_timeout=20, close_timeout=5
            )
            await next_frame(ws, "hello", wait_s=20)
            await ws.send(json.dumps({"type": "join", "room_id": room_id, "limit": 1}))
            await next_frame(ws, "joined", wait_s=20)
            return ws

        sockets: list[ClientConnection] = []
        started = time.monotonic()
        try:
            for start in range(0, total, batch):
                sockets += await asyncio.gather(
                    *(open_one(users[n % len(users)]) for n in range(start, start + batch))
                )
            opened = time.monotonic() - started
            assert hub.stats()["connections"] == total + 1
            assert hub.stats()["subscriptions"] == total + 1
            assert len(hub.online(room_id)) == len(users) + 1

            async def end(n: int, ws: ClientConnection) -> None:
                if n % 3 == 2:
                    ws.transport.abort()  # gone without a close frame
                else:
                    await ws.close()

            for start in range(0, total, batch):
                chunk = sockets[start : start + batch]
                await asyncio.gather(*(end(start + i, ws) for i, ws in enumerate(chunk)))
            closed = time.monotonic() - started - opened
        finally:
            for ws in sockets:
                ws.transport.abort()

        await wait_until(
            lambda: hub.stats() == baseline_stats,
            wait_s=5,
            what=lambda: f"hub stats {hub.stats()}, baseline {baseline_stats}",
        )
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= baseline_tasks + 3,
            wait_s=5,
            what=lambda: f"{len(asyncio.all_tasks())} tasks, baseline {baseline_tasks}",
        )
        again = await join(watcher, room_id, limit=1)
        assert [u["id"] for u in again["online"]] == [owner.id]
        log.info(
            f"churn: {total} opened in {opened:.1f} s, closed/aborted in {closed:.1f} s; "
            f"tasks {len(asyncio.all_tasks())} (baseline {baseline_tasks})"
        )

    await wait_until(
        lambda: all(value == 0 for value in hub.stats().values()),
        wait_s=5,
        what=lambda: f"hub stats {hub.stats()}",
    )


# --- 3. heartbeat ------------------------------------------------------------------------------

PARKED_CLIENT = textwrap.dedent(
    """
    import asyncio, json, os, websockets

    async def main():
        async with websockets.connect(
            os.environ["WS_URL"],
            additional_headers={"Authorization": "Bearer " + os.environ["WS_TOKEN"]},
        ) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "join", "room_id": os.environ["ROOM_ID"]}))
            while json.loads(await ws.recv())["type"] != "joined":
                pass
            print("ready", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_vanished_and_silent_peers_are_removed(
    live_server_factory: LiveServerFactory,
) -> None:
    live = await live_server_factory(
        heartbeat_interval_s=1, heartbeat_timeout_s=1, signup_ip_limit=MANY_SIGNUPS
    )
    hub = hub_of(live)
    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        owner = await new_user(http, "owner")
        ghost = await new_user(http, "ghost")
        room_id = await new_room(http, owner, ghost)

    # A client process killed with SIGKILL: no close frame, no goodbye.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARKED_CLIENT,
        env={**os.environ, "WS_URL": f"{live.ws}/ws", "WS_TOKEN": ghost.token, "ROOM_ID": room_id},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        assert hub.stats()["subscriptions"] == 1
        process.kill()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    gone = await wait_until(
        lambda: hub.stats()["connections"] == 0 and hub.stats()["subscriptions"] == 0,
        wait_s=5,
        what=lambda: f"hub stats {hub.stats()} after the client process was killed",
    )

    # A peer that completed the handshake and then went silent: it never reads, so it never
    # answers a ping. Only the heartbeat can find it.
    silent = await RawWebSocket.connect(
        live.port, "/ws", {"Authorization": f"Bearer {ghost.token}"}
    )
    try:
        hello = await silent.recv_json()
        assert hello["type"] == "hello"
        assert hello["heartbeat_s"] == 1
        await silent.send_json({"type": "join", "room_id": room_id, "limit": 1})
        assert hub.stats()["connections"] == 1
        silent_gone = await wait_until(
            lambda: hub.stats()["connections"] == 0 and hub.stats()["subscriptions"] == 0,
            wait_s=5,
            what=lambda: f"hub stats {hub.stats()}: the silent peer is still registered",
        )
        assert silent_gone > 0.5, "removed before any heartbeat could have run"
        # What the server wrote: a ping, then a close for the unanswered ping (1011).
        opcodes: list[int] = []
        close_code: int | None = None
        with contextlib.suppress(PeerClosed, ConnectionError, TimeoutError):
            while True:
                opcode, payload = await silent.recv_frame(wait_s=3)
                opcodes.append(opcode)
                if opcode == 0x8:
                    close_code = int.from_bytes(payload[:2], "big")
                    break
        assert 0x9 in opcodes, f"no ping was sent to the silent peer: {opcodes}"
        assert close_code == 1011, close_code
    finally:
        silent.close()
    log.info(f"killed client removed after {gone:.2f} s, silent peer after {silent_gone:.2f} s")


# --- 4. graceful shutdown -----------------------------------------------------------------------


ProcessFactory = Callable[..., ServerProcess]


@pytest.fixture
def process_factory(server_env: dict[str, str], tmp_path: Path) -> Iterator[ProcessFactory]:
    """`chat-service serve` processes with extra environment; all stopped after the test."""
    started: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        process = ServerProcess(
            env={**server_env, "SIGNUP_IP_LIMIT": MANY_SIGNUPS, **env},
            port=free_port(),
            workdir=tmp_path,
        )
        process.start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


async def wait_exit(server: ServerProcess, wait_s: float) -> int | None:
    assert server.process is not None
    try:
        return await asyncio.to_thread(server.process.wait, wait_s)
    except subprocess.TimeoutExpired:
        return None


@contextlib.asynccontextmanager
async def recorders(
    base: str, users: list[User], room_id: str | None
) -> AsyncIterator[list[Recorder]]:
    """A connection per user (joined to `room_id` if given), each read by a Recorder."""
    async with contextlib.AsyncExitStack() as stack:
        result = []
        for user in users:
            ws = await stack.enter_async_context(ws_connect(base, user))
            await next_frame(ws, "hello")
            if room_id is not None:
                await join(ws, room_id, limit=1)
            result.append(Recorder(ws).start())
        yield result


async def test_sigterm_drains_flushes_and_closes_1012(process_factory: ProcessFactory) -> None:
    drain_delay, grace = 1.5, 5.0
    server: ServerProcess = process_factory(
        SHUTDOWN_DRAIN_DELAY_S=str(drain_delay), SHUTDOWN_GRACE_S=str(int(grace))
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        users = [await new_user(http, name) for name in ("alpha", "beta", "gamma")]
        room_id = await new_room(http, users[0], *users[1:])

        async with recorders(ws_url(server), users, room_id) as (alpha, beta, gamma):
            await alpha.ws.send(
                json.dumps(
                    {
                        "type": "message.send",
                        "room_id": room_id,
                        "body": "last words",
                        "client_id": "last-words",
                        "ref": "last",
                    }
                )
            )
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            draining: Json | None = None
            while draining is None and time.monotonic() - signalled < drain_delay:
                with contextlib.suppress(httpx.TransportError):
                    ready = await http.get("/readyz")
                    if ready.status_code == 503:
                        draining = ready.json()
                await asyncio.sleep(0.05)
            assert draining is not None, "/readyz did not turn 503 during the drain delay"
            assert draining["checks"]["shutdown"] == "draining", draining
            assert draining["code"] == "unavailable", draining

            codes = [await r.wait_closed(drain_delay + grace + 3) for r in (alpha, beta, gamma)]
            assert codes == [1012, 1012, 1012], codes
            # Sockets stay open while load balancers take the instance out, then get 1012.
            for recorder in (alpha, beta, gamma):
                assert recorder.closed_at is not None
                assert recorder.closed_at - signalled > drain_delay - 0.3, "closed before the delay"

    code = await wait_exit(server, drain_delay + grace + 3)
    elapsed = time.monotonic() - signalled
    assert code == 0, f"exit code {code} after {elapsed:.1f} s:\n{server.logs()[-3000:]}"
    assert elapsed < drain_delay + grace + 3, elapsed
    # The message sent just before SIGTERM was committed, acked and delivered before 1012.
    acks = [f for f in alpha.frames if f["type"] == "ack"]
    assert [a["client_id"] for a in acks] == ["last-words"], alpha.frames
    for other in (beta, gamma):
        news = [f["message"]["client_id"] for f in other.of_type("message.new")]
        assert news == ["last-words"], other.frames
    logs = server.logs()
    assert "Traceback" not in logs, logs
    log.info(f"SIGTERM to exit: {elapsed:.2f} s (drain delay {drain_delay} s)")


async def test_sigterm_with_an_idle_socket_exits_promptly(process_factory: ProcessFactory) -> None:
    server: ServerProcess = process_factory(SHUTDOWN_DRAIN_DELAY_S="0", SHUTDOWN_GRACE_S="10")
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        user = await new_user(http, "idle")
    async with recorders(ws_url(server), [user], None) as (idle,):
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await idle.wait_closed(5) == 1012
        code = await wait_exit(server, 10)
    elapsed = time.monotonic() - signalled
    assert code == 0, f"exit code {code}:\n{server.logs()[-3000:]}"
    assert elapsed < 3, f"an idle handler held the shutdown for {elapsed:.1f} s"
    log.info(f"idle server: SIGTERM to exit {elapsed:.2f} s")


# --- 5. resume across a restart ----------------------------------------------------------------


async def test_resume_after_a_restart_is_gapless(process_factory: ProcessFactory) -> None:
    first: ServerProcess = process_factory()
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
        author = await new_user(http, "author")
        reader = await new_user(http, "reader")
        room_id = await new_room(http, author, reader)

        last_seen = 0
        async with ws_connect(ws_url(first), reader) as ws:
            await next_frame(ws, "hello")
            await join(ws, room_id)
            for n in range(1, 6):
                await post_message(http, room_id, author, f"live {n}")
                event = await next_frame(ws, "message.new")
                assert event["message"]["change_seq"] == last_seen + 1, event
                last_seen = event["message"]["change_seq"]
        assert last_seen == 5

        # Away: new messages, an edit and a delete of messages seen before, on server A...
        for n in range(6, 9):
            await post_message(http, room_id, author, f"away {n}")
        edited = await http.patch(
            f"{API}/rooms/{room_id}/messages/2",
            json={"body": "live 2, edited"},
            headers=author.headers,
        )
        assert edited.status_code == 200, edited.text
    stop_cleanly(first)

    second: ServerProcess = process_factory()
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
        # ... and on server B before the client comes back.
        deleted = await http.delete(f"{API}/rooms/{room_id}/messages/3", headers=author.headers)
        assert deleted.status_code == 204, deleted.text
        await post_message(http, room_id, author, "away 11")
        edited = await http.patch(
            f"{API}/rooms/{room_id}/messages/7",
            json={"body": "away 7, edited"},
            headers=author.headers,
        )
        assert edited.status_code == 200, edited.text

        async with ws_connect(ws_url(second), reader) as ws:
            await next_frame(ws, "hello")
            joined = await join(ws, room_id, since_seq=last_seen)
            changes = [
                (m["change_seq"], m["seq"], m["body"], m["deleted"]) for m in joined["messages"]
            ]
            assert changes == [
                (6, 6, "away 6", False),
                (8, 8, "away 8", False),
                (9, 2, "live 2, edited", False),
                (10, 3, "", True),
                (11, 11, "away 11", False),
                (12, 7, "away 7, edited", False),
            ], changes
            assert joined["last_seq"] == 12
            assert joined["truncated"] is False
            # The same as REST's view, and live delivery continues right after the snapshot.
            rest = await http.get(
                f"{API}/rooms/{room_id}/messages",
                params={"after_seq": last_seen},
                headers=reader.headers,
            )
            assert rest.json()["items"] == joined["messages"]
            await post_message(http, room_id, author, "back live")
            event = await next_frame(ws, "message.new")
            assert event["message"]["change_seq"] == 13, event


# --- 6. log secrecy -----------------------------------------------------------------------------


async def test_websocket_credentials_never_reach_the_logs(process_factory: ProcessFactory) -> None:
    server: ServerProcess = process_factory(LOG_LEVEL="DEBUG", LOG_FORMAT="json")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        user = await new_user(http, "secretive")
        response = await http.post(f"{API}/auth/ws-ticket", headers=user.headers)
        assert response.status_code == 200, response.text
        ticket = response.json()["ticket"]

    base = ws_url(server)
    async with websockets.connect(f"{base}/ws?ticket={ticket}", open_timeout=10) as ws:
        assert (await next_frame(ws, "hello"))["user"]["id"] == user.id
    async with websockets.connect(
        f"{base}/ws", subprotocols=["chat.v1", f"bearer.{user.token}"], open_timeout=10
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        assert (await next_frame(ws, "hello"))["user"]["id"] == user.id
    async with ws_connect(base, user) as ws:
        assert (await next_frame(ws, "hello"))["user"]["id"] == user.id

    logs = stop_cleanly(server)
    entries = json_log(logs)
    assert_not_logged(logs, {"ws ticket": ticket, "access token": user.token})
    accepted = [e["msg"] for e in entries if "WebSocket /ws" in e["msg"] and "accepted" in e["msg"]]
    assert any("/ws?ticket=" in line for line in accepted), accepted
    assert sum("/ws" in line for line in accepted) >= 3, accepted


# --- 7. the hub's per-room order ---------------------------------------------------------------


class FakeConnection:
    def __init__(self, name: str) -> None:
        self.user = UserSummary(id=name, username=name, display_name=name)
        self.session_id = f"session-{name}"
        self.rooms: set[str] = set()
        self.joining: dict[str, list[Any]] = {}
        self.frames: list[Json] = []

    @property
    def user_id(self) -> str:
        return self.user.id

    def offer(self, frame: Outbound) -> None:
        self.frames.append(orjson.loads(frame.text))

    def seqs(self) -> list[int]:
        return [f["message"]["change_seq"] for f in self.frames if f["type"] == "message.new"]


def message_event(room_id: str, seq: int) -> Event:
    message = {"id": f"m{seq}", "room_id": room_id, "seq": seq, "change_seq": seq, "body": "b"}
    return Event("message.new", {"message": message}, room_id=room_id)


async def test_hub_delivers_each_room_in_seq_order() -> None:
    presence: list[tuple[str, str]] = []
    hub = Hub()
    hub.on_presence = lambda room_id, _user, status: presence.append((room_id, status))
    reader = FakeConnection("reader")
    hub.register(reader)  # type: ignore[arg-type]
    for room in ("ordered", "gappy"):  # as the gateway joins: subscribe, history, finish
        hub.subscribe(reader, room)  # type: ignore[arg-type]
        hub.finish_join(reader, room, 0)  # type: ignore[arg-type]

    for seq in (1, 3, 2):
        hub.dispatch(message_event("ordered", seq))
    await asyncio.sleep(REORDER_WAIT_S / 4)
    assert reader.seqs() == [1, 2, 3], "3 overtook 2"

    reader.frames.clear()
    for seq in (1, 3):
        hub.dispatch(message_event("gappy", seq))
    await asyncio.sleep(REORDER_WAIT_S / 4)
    assert reader.seqs() == [1], "3 went out before its wait for 2 was over"
    await asyncio.sleep(REORDER_WAIT_S * 1.5)
    assert reader.seqs() == [1, 3], "a lost seq stalls the room"
    hub.dispatch(message_event("gappy", 4))
    await asyncio.sleep(0.01)
    assert reader.seqs() == [1, 3, 4]

    # Before any join has told the hub where a room stands, events wait for it.
    hub.subscribe(reader, "fresh")  # type: ignore[arg-type]
    reader.frames.clear()
    for seq in (6, 5):
        hub.dispatch(message_event("fresh", seq))
    assert reader.seqs() == []
    hub.finish_join(reader, "fresh", 4)  # type: ignore[arg-type]
    assert reader.seqs() == [5, 6]

    hub.unregister(reader)  # type: ignore[arg-type]
    assert all(value == 0 for value in hub.stats().values()), hub.stats()
    # Presence changes are reported once per room: the user's first and last subscription.
    rooms = ["ordered", "gappy", "fresh"]
    assert presence[:3] == [(room, "online") for room in rooms]
    assert sorted(presence[3:]) == sorted((room, "offline") for room in rooms)
