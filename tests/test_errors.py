"""One error shape for every 4xx and 5xx; no stack trace or SQL ever reaches a client."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from tests.conftest import AppFactory, client_for
from tests.helpers import API


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
    ],
    ids=["malformed", "not-an-object", "form-instead-of-json", "invalid-utf8"],
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
