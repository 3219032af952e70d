"""Logs of a real `chat-service serve` (LOG_FORMAT=json, LOG_LEVEL=DEBUG): every HTTP line
carries the request id the response announced, every WebSocket line its connection's id, and
no password, token, ticket or message body ever reaches the log, at any level.

Plus the request-id rules themselves (kept, replaced, generated; exposed through CORS).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.conftest import AppFactory, client_for
from tests.helpers import API, ServerProcess, bearer

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

TIMEOUT_S = 5.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Seen:
    """One HTTP exchange as the client saw it."""

    method: str
    path: str
    status: int
    request_id: str
    sent_id: str | None


@dataclass(frozen=True)
class Socket:
    """One WebSocket handshake: its request id, and the connection id from `hello` (None
    when the handshake was refused)."""

    request_id: str
    connection_id: str | None


async def recv(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
    assert isinstance(raw, str)
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def recv_type(ws: ClientConnection, frame_type: str) -> dict[str, Any]:
    while (frame := await recv(ws))["type"] != frame_type:
        assert frame["type"] in ("presence", "typing", "message.new"), frame
    return frame


def handshake_id(ws: ClientConnection) -> str:
    assert ws.response is not None
    request_id = ws.response.headers.get("X-Request-ID")
    assert request_id, ws.response.headers
    return str(request_id)


async def chat(url: str, room_id: str, body: str, **options: Any) -> Socket:
    """Connect, join, send `body`, see it acked, leave."""
    async with connect(url, open_timeout=TIMEOUT_S, **options) as ws:
        hello = await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room_id": room_id, "limit": 5}))
        await recv_type(ws, "joined")
        send = {"type": "message.send", "room_id": room_id, "body": body, "client_id": body}
        await ws.send(json.dumps(send))
        await recv_type(ws, "ack")
        return Socket(handshake_id(ws), hello["connection_id"])


async def refused(url: str, **options: Any) -> Socket:
    async with connect(url, open_timeout=TIMEOUT_S, **options) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert closed.value.rcvd is not None, "closed without a close frame"
    assert closed.value.rcvd.code == 4401, closed.value.rcvd
    return Socket(handshake_id(ws), None)


async def test_json_logs_carry_ids_and_never_secrets(server: ServerProcess) -> None:
    mark = secrets.token_hex(6)
    password = f"pw-SECRET-{mark}"
    bodies = [f"BODY-SECRET-{mark}-{n}" for n in range(4)]
    secrets_sent: list[str] = [password, f"wrong-SECRET-{mark}", *bodies]
    seen: list[Seen] = []

    async def note(response: httpx.Response) -> None:
        request = response.request
        seen.append(
            Seen(
                request.method,
                request.url.path,
                response.status_code,
                response.headers["X-Request-ID"],
                request.headers.get("X-Request-ID"),
            )
        )

    sane_id = f"trace-{mark}.1:a"
    async with httpx.AsyncClient(
        base_url=server.url, timeout=10, event_hooks={"response": [note]}
    ) as http:

        async def new_user(name: str, request_id: str | None = None) -> dict[str, Any]:
            headers = {"X-Request-ID": request_id} if request_id else {}
            response = await http.post(
                f"{API}/auth/signup",
                json={"username": f"{name}_{mark}", "password": password},
                headers=headers,
            )
            assert response.status_code == 201, response.text
            body: dict[str, Any] = response.json()
            secrets_sent.extend([body["access_token"], body["refresh_token"]])
            return body

        alice = await new_user("alice", sane_id)
        bob = await new_user("bob", "not sane: spaces and / slashes")
        carol = await new_user("carol", "x" * 129)
        wrong = {"username": f"alice_{mark}", "password": secrets_sent[1]}
        failed = await http.post(f"{API}/auth/login", json=wrong)
        assert failed.status_code == 401
        form = {"username": f"alice_{mark}", "password": password}
        token = await http.post(f"{API}/auth/token", data=form)
        assert token.status_code == 200
        secrets_sent.extend([token.json()["access_token"], token.json()["refresh_token"]])
        rotate = {"refresh_token": carol["refresh_token"]}
        renewed = await http.post(f"{API}/auth/refresh", json=rotate)
        assert renewed.status_code == 200
        secrets_sent.extend([renewed.json()["access_token"], renewed.json()["refresh_token"]])
        assert (await http.post(f"{API}/auth/refresh", json=rotate)).status_code == 401

        alice_h, bob_h = bearer(alice["access_token"]), bearer(bob["access_token"])
        room = await http.post(f"{API}/rooms", json={"name": f"r{mark}"}, headers=alice_h)
        room_id = room.json()["id"]
        assert (await http.post(f"{API}/rooms/{room_id}/join", headers=bob_h)).status_code == 200
        posted = await http.post(
            f"{API}/rooms/{room_id}/messages", json={"body": bodies[3]}, headers=bob_h
        )
        assert posted.status_code == 201
        tickets = [
            (await http.post(f"{API}/auth/ws-ticket", headers=bob_h)).json()["ticket"]
            for _ in range(2)
        ]
        secrets_sent.extend(tickets)

        ws = f"ws://127.0.0.1:{server.port}"
        accepted = [
            await chat(f"{ws}/ws", room_id, bodies[0], additional_headers=alice_h),
            await chat(f"{ws}/ws?ticket={tickets[0]}", room_id, bodies[1]),
            await chat(
                f"{ws}/ws",
                room_id,
                bodies[2],
                subprotocols=[Subprotocol("chat.v1"), Subprotocol(f"bearer.{bob['access_token']}")],
            ),
        ]
        # A token refreshed over the socket travels in a frame: it must not be logged either.
        async with connect(f"{ws}/ws", additional_headers=alice_h) as refresher:
            hello = await recv_type(refresher, "hello")
            await refresher.send(
                json.dumps({"type": "auth.refresh", "access_token": token.json()["access_token"]})
            )
            await recv_type(refresher, "auth.refreshed")
            accepted.append(Socket(handshake_id(refresher), hello["connection_id"]))
        refusals = [
            await refused(f"{ws}/ws?ticket={tickets[0]}"),  # spent
            await refused(f"{ws}/ws?access_token={alice['access_token']}"),
            await refused(f"{ws}/ws", additional_headers=bearer(f"{alice['access_token']}x")),
        ]

    assert server.stop() == 0
    text = server.logs()
    lines = text.splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line is not JSON: {line!r}") from None
    assert len(entries) > 50, text

    # Nothing secret, at DEBUG level, anywhere: no password, token, ticket, message body.
    for secret in secrets_sent:
        assert secret not in text, f"{secret[:12]}... reached the log"
    # A JWT: base64url JSON header ("eyJ…"), payload and signature, dot-separated. (A bare
    # "eyJ" also turns up by chance inside base64 handshake keys.)
    jwts = re.findall(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+", text)
    assert not jwts, f"something JWT-shaped reached the log: {jwts[0][:16]}..."
    assert not [e for e in entries if re.match(r"[<>] (TEXT|BINARY)", e["msg"])], "frame dump"

    # HTTP: each response's id is on exactly one access line, which describes that request.
    by_request: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry["logger"] == "uvicorn.access":
            assert entry.get("request_id"), entry
            by_request.setdefault(entry["request_id"], []).append(entry)
    assert len(seen) == 12
    for exchange in seen:
        access = by_request.get(exchange.request_id, [])
        assert len(access) == 1, (exchange, access)
        line = access[0]
        assert (line["method"], line["status"]) == (exchange.method, exchange.status), line
        assert line["path"].split("?")[0] == exchange.path, line
        assert line["duration_ms"] >= 0
    assert seen[0].request_id == seen[0].sent_id == sane_id, seen[0]
    for insane in seen[1:3]:
        assert insane.sent_id is not None
        assert insane.request_id != insane.sent_id
        assert GENERATED_ID.fullmatch(insane.request_id), insane
    assert len({exchange.request_id for exchange in seen}) == len(seen), "ids repeat"

    # WebSocket: every line about a socket names it; an accepted one by its hello's id.
    ws_lines = [
        e
        for e in entries
        if e["logger"].startswith("chat_service.realtime") or '"WebSocket ' in e["msg"]
    ]
    for socket in accepted:
        assert socket.connection_id is not None
        mine = [e for e in ws_lines if e.get("connection_id") == socket.connection_id]
        messages = {e["msg"] for e in mine}
        assert {"websocket open", "websocket closed"} <= messages, mine
        assert any("[accepted]" in message for message in messages), mine
        assert {e.get("request_id") for e in mine} == {socket.request_id}, mine
    refused_ids = {socket.request_id for socket in refusals}
    for entry in ws_lines:
        if "connection_id" not in entry:
            assert entry.get("request_id") in refused_ids, entry
    for socket in refusals:
        mine = [e for e in ws_lines if e.get("request_id") == socket.request_id]
        assert [e.get("close_code") for e in mine if e["msg"] == "websocket refused"] == [4401]
    redacted = [e["msg"] for e in ws_lines if "?ticket=" in e["msg"] or "access_token=" in e["msg"]]
    assert redacted, "the refused handshakes' paths were logged"
    assert all("[redacted]" in message for message in redacted), redacted


async def test_request_ids_are_kept_replaced_or_made(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with client_for(app) as client:
        kept = await client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.2:x_y-z"})
        assert kept.headers["X-Request-ID"] == "lb-7f3a.2:x_y-z"
        latin1 = "caf\xe9".encode("latin-1")
        for bad in ("x" * 129, "-starts-with-dash", "has space", "semi;colon", latin1):
            response = await client.get("/healthz", headers={"X-Request-ID": bad})
            assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"]), bad
        made = [await client.get(path) for path in ("/healthz", "/nowhere", f"{API}/users/me")]
    assert [response.status_code for response in made] == [200, 404, 401]
    ids = [response.headers["X-Request-ID"] for response in made]
    assert all(GENERATED_ID.fullmatch(request_id) for request_id in ids), ids
    assert len(set(ids)) == 3


async def test_browsers_may_send_and_read_the_request_id(app_factory: AppFactory) -> None:
    app = await app_factory(cors_origins=["https://app.example"])
    origin = {"Origin": "https://app.example"}
    async with client_for(app) as client:
        preflight = await client.options(
            f"{API}/users/me",
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, x-request-id",
            },
        )
        simple = await client.get("/healthz", headers={**origin, "X-Request-ID": "from-browser"})
    assert preflight.status_code == 200, preflight.text
    assert "x-request-id" in preflight.headers["access-control-allow-headers"].lower()
    assert GENERATED_ID.fullmatch(preflight.headers["X-Request-ID"])
    assert simple.headers["X-Request-ID"] == "from-browser"
    exposed = simple.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed, exposed
