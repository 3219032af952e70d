"""One error shape for every 4xx and 5xx; no stack trace or SQL ever reaches a client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
import websockets
from fastapi import FastAPI

from chat_service.api.input_guard import BODY_MAX_BYTES
from tests.conftest import AppFactory, LiveServer, client_for
from tests.helpers import API, bearer, signup


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"{API}/nothing-here")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found", "code": "not_found"}
    wrong = await client.get(f"{API}/auth/login")
    assert wrong.status_code == 405
    assert wrong.json() == {"detail": "Method Not Allowed", "code": "method_not_allowed"}


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b'"just a string"', "application/json"),
        (b"username=a&password=b", "application/x-www-form-urlencoded"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"\xff", "application/json"),
        (b"username=\xff&password=\xfe", "application/x-www-form-urlencoded"),
    ],
    ids=["malformed", "not-an-object", "form-instead-of-json", "nul", "not-utf8", "form-not-utf8"],
)
async def test_bad_bodies_get_422_with_errors(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    response = await client.post(
        f"{API}/auth/login", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"detail", "code", "errors"}
    assert body["code"] == "invalid"
    assert body["errors"]
    for error in body["errors"]:
        assert set(error) == {"loc", "msg", "type"}


async def test_unexpected_failures_answer_500_without_details(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode() -> None:
        raise RuntimeError("secret internals: SELECT * FROM users")

    app.add_api_route("/explode", explode)
    async with client_for(app) as client:
        response = await client.get("/explode")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error", "code": "internal"}
    assert "SELECT" not in response.text
    assert "Traceback" not in response.text
    assert "secret internals" in caplog.text  # the operator still sees it, in the log


async def test_database_down_is_503_not_a_hang(app_factory: AppFactory) -> None:
    app = await app_factory(
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere",
        db_connect_timeout_s=1,
    )
    async with client_for(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "detail": "Not ready",
            "code": "unavailable",
            "checks": {"database": "unavailable", "broker": "ok"},
        }
        signup = await client.post(
            f"{API}/auth/signup", json={"username": "nobody", "password": "long enough"}
        )
        assert signup.status_code == 503
        assert signup.json()["code"] == "unavailable"
        assert "127.0.0.1" not in signup.text


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


async def test_integrity_errors_are_not_leaked(client: httpx.AsyncClient, app: FastAPI) -> None:
    async def violate() -> None:
        async with app.state.engine.begin() as connection:
            await connection.execute(sa.text("INSERT INTO users (id) VALUES (NULL)"))

    app.add_api_route("/violate", violate)
    response = await client.get("/violate")
    assert response.status_code == 500
    assert response.json()["code"] == "internal"
    assert "INSERT" not in response.text


# --- input no route can take (api/input_guard.py) --------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/auth/signup", {"json": {"username": "nul", "password": "long enough \x00"}}),
        ("POST", "/auth/token", {"data": {"username": "a\x00b", "password": "long enough"}}),
        ("GET", "/rooms", {"params": {"q": "a\x00b"}}),
        ("GET", "/rooms/a%00b", {}),
    ],
    ids=["json-body", "form-body", "query", "path"],
)
async def test_nul_characters_are_refused_422_on_every_backend(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, object]
) -> None:
    response = await client.request(method, f"{API}{path}", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid"
    assert body["errors"][0]["type"] == "nul"


async def test_text_that_only_looks_like_nul_is_stored(client: httpx.AsyncClient) -> None:
    token = (await signup(client, "lookalike"))["access_token"]
    room = await client.post(f"{API}/rooms", json={"name": "r"}, headers=bearer(token))
    text = "a literal \\u0000, a URL with %00 in it, and \\\\u0000"
    sent = await client.post(
        f"{API}/rooms/{room.json()['id']}/messages", json={"body": text}, headers=bearer(token)
    )
    assert sent.status_code == 201, sent.text
    assert sent.json()["body"] == text


async def test_bodies_over_64_kib_are_refused_413(client: httpx.AsyncClient) -> None:
    big = {"username": "big", "password": "x" * (BODY_MAX_BYTES + 1)}
    declared = await client.post(f"{API}/auth/signup", json=big)
    assert declared.status_code == 413, declared.text
    assert declared.json()["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"username": "big", "password": "'
        for _ in range(BODY_MAX_BYTES // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    streamed = await client.post(
        f"{API}/auth/signup", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413, streamed.text
    just_under = await client.post(
        f"{API}/auth/login", json={"username": "u", "password": "p" * (BODY_MAX_BYTES - 100)}
    )
    assert just_under.status_code == 422, just_under.text  # read, then refused on its merits


async def test_nul_in_a_websocket_frame_or_room_url(live: LiveServer) -> None:
    async with client_for(live.app) as client:
        token = (await signup(client, "wsnul"))["access_token"]
        room = (await client.post(f"{API}/rooms", json={"name": "r"}, headers=bearer(token))).json()
    headers = bearer(token)
    async with websockets.connect(f"{live.ws}/ws", additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        frame = {"type": "message.send", "room_id": room["id"], "body": "a\x00b", "ref": "n1"}
        await ws.send(json.dumps(frame))
        error = json.loads(await ws.recv())
        assert (error["type"], error["code"], error["ref"]) == ("error", "invalid_frame", "n1")
        await ws.send(json.dumps({"type": "ping", "ref": "p1"}))
        assert json.loads(await ws.recv())["type"] == "pong"  # the socket lives on
    async with websockets.connect(f"{live.ws}/ws/rooms/a%00b", additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4404
