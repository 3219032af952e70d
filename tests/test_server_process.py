"""The service as operators run it: a real `chat-service serve` process over real sockets.

These tests see what in-process ASGI tests cannot: uvicorn's own log lines (access log with
query strings), the process's exit code on SIGTERM, the embedded SQLite default with its
generated secret on disk, and readiness against a database that is not there.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from chat_service.app import GC_YOUNG_THRESHOLD
from tests.helpers import API, TEST_JWT_SECRET, ServerProcess, bearer, free_port

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

LOG_KEYS = {"ts", "level", "logger", "msg"}
PREFIX_LEN = 16
# The variables that select the embedded default when absent (pydantic-settings reads the
# environment case-insensitively, so every spelling is removed).
EMBEDDED_DEFAULT_UNSET = ("DATABASE_URL", "JWT_SECRET", "DATA_DIR", "ENVIRONMENT")


class IsolatedServerProcess(ServerProcess):
    """A ServerProcess whose environment lacks some variables entirely.

    ServerProcess layers `env` over os.environ, which can add or change a variable but not
    remove one; the embedded-default test needs them gone.
    """

    def __init__(self, *, unset: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        names = {name.upper() for name in unset}
        self._env = {key: value for key, value in self._env.items() if key.upper() not in names}


def json_log(text: str) -> list[dict[str, Any]]:
    """Every line of a LOG_FORMAT=json log, parsed; fails on the first line that is not JSON."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"log line {number} is not JSON ({exc}): {line!r}") from exc
        assert isinstance(entry, dict), f"log line {number} is not an object: {line!r}"
        missing = LOG_KEYS - entry.keys()
        assert not missing, f"log line {number} lacks {sorted(missing)}: {line!r}"
        entries.append(entry)
    assert entries, "the server wrote no log at all"
    return entries


def fragments(secret: str) -> set[str]:
    """The secret, its head and tail, and for a JWT the head of each part: none may be logged.

    A JWT's header part is the same for every token and its payload starts with the user id,
    so a fragment may be shared by several tokens: the message names one of them.
    """
    parts = {secret, secret[:PREFIX_LEN], secret[-PREFIX_LEN:]}
    if secret.count(".") == 2:  # a JWT: the header is the same for every token, but still
        parts.update(part[:PREFIX_LEN] for part in secret.split(".") if len(part) >= PREFIX_LEN)
    return parts


def assert_not_logged(logs: str, secrets_by_name: dict[str, str]) -> None:
    lowered = logs.lower()
    for name, secret in secrets_by_name.items():
        for fragment in fragments(secret):
            assert fragment.lower() not in lowered, (
                f"{name}, or its fragment {fragment!r}, is logged"
            )


def stop_cleanly(server: ServerProcess) -> str:
    """SIGTERM; the process must exit 0 within the grace period with no traceback logged."""
    started = time.monotonic()
    code = server.stop(timeout=15)
    elapsed = time.monotonic() - started
    logs = server.logs()
    assert code == 0, f"exit code {code} after SIGTERM ({elapsed:.1f} s); log:\n{logs}"
    assert "Traceback" not in logs, logs
    return logs


async def try_websocket(url: str, **options: Any) -> None:
    """Open and close a WebSocket handshake; whether it is accepted does not matter here."""
    try:
        async with websockets.connect(url, open_timeout=5, close_timeout=2, **options):
            pass
    except (websockets.exceptions.WebSocketException, OSError, TimeoutError):
        pass  # refused or closed: only what the server logged about it matters


def assert_error_shape(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """The contract's error body, with `code` when given (else any code), and no internals."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("detail"), str), body
    assert body["detail"], body
    assert isinstance(body.get("code"), str), body
    assert body["code"], body
    if code is not None:
        assert body["code"] == code, body
    for leak in ("Traceback", "sqlalchemy", 'File "'):
        assert leak.lower() not in response.text.lower(), response.text
    return body


async def test_readme_flow_over_real_sockets_leaks_nothing_and_stops_cleanly(
    server: ServerProcess,
) -> None:
    username = f"reader_{secrets.token_hex(3)}"
    password = f"pw-{secrets.token_urlsafe(18)}"
    seen: dict[str, str] = {"password": password}

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        signup = await client.post(
            f"{API}/auth/signup", json={"username": username, "password": password}
        )
        assert signup.status_code == 201, signup.text
        body = signup.json()
        assert set(body) >= {"user", "access_token", "refresh_token", "token_type", "expires_in"}
        assert body["token_type"] == "bearer"
        assert body["user"]["username"] == username
        user_id = body["user"]["id"]
        seen |= {"signup access": body["access_token"], "signup refresh": body["refresh_token"]}

        login = await client.post(
            f"{API}/auth/login", json={"username": username, "password": password}
        )
        assert login.status_code == 200, login.text
        assert login.json()["token_type"] == "bearer"
        assert login.json()["user"]["id"] == user_id
        login_access = login.json()["access_token"]
        seen |= {"login access": login_access, "login refresh": login.json()["refresh_token"]}

        form = await client.post(
            f"{API}/auth/token", data={"username": username, "password": password}
        )
        assert form.status_code == 200, form.text
        assert form.json()["user"]["id"] == user_id
        access, refresh = form.json()["access_token"], form.json()["refresh_token"]
        seen |= {"form access": access, "form refresh": refresh}

        me = await client.get(f"{API}/users/me", headers=bearer(access))
        assert me.status_code == 200, me.text
        assert set(me.json()) == {"id", "username", "display_name", "created_at"}
        assert me.json()["id"] == user_id
        unauthenticated = await client.get(f"{API}/users/me")
        assert_error_shape(unauthenticated, 401, "not_authenticated")

        ticket = await client.post(f"{API}/auth/ws-ticket", headers=bearer(access))
        assert ticket.status_code == 200, ticket.text
        assert ticket.json()["expires_in"] > 0
        seen["ws ticket"] = ticket.json()["ticket"]
        ws_base = server.url.replace("http://", "ws://", 1)
        # The three handshake credentials, where uvicorn logs them: the query string (INFO)
        # and, at DEBUG, every request header, the subprotocol list included.
        await try_websocket(f"{ws_base}/ws?ticket={seen['ws ticket']}")
        await try_websocket(f"{ws_base}/ws", additional_headers=bearer(login_access))
        await try_websocket(f"{ws_base}/ws", subprotocols=["chat.v1", f"bearer.{access}"])

        rotated = await client.post(f"{API}/auth/refresh", json={"refresh_token": refresh})
        assert rotated.status_code == 200, rotated.text
        new_access, new_refresh = rotated.json()["access_token"], rotated.json()["refresh_token"]
        assert new_refresh != refresh
        seen |= {"rotated access": new_access, "rotated refresh": new_refresh}
        assert (await client.get(f"{API}/users/me", headers=bearer(new_access))).status_code == 200

        logout = await client.post(
            f"{API}/auth/logout", json={"refresh_token": new_refresh}, headers=bearer(new_access)
        )
        assert logout.status_code == 204, logout.text
        assert logout.content == b""

        for name, token in (("form access", access), ("rotated access", new_access)):
            after = await client.get(f"{API}/users/me", headers=bearer(token))
            assert after.status_code == 401, f"{name} still works after logout: {after.text}"
            assert after.headers.get("www-authenticate", "").lower().startswith("bearer")
        for name, token in (("rotated refresh", new_refresh), ("spent refresh", refresh)):
            after = await client.post(f"{API}/auth/refresh", json={"refresh_token": token})
            assert after.status_code == 401, f"{name} still works after logout: {after.text}"
            assert_error_shape(after, 401)
        # Logout ends that one session, not the user's others.
        other = await client.get(f"{API}/users/me", headers=bearer(login_access))
        assert other.status_code == 200, other.text

        probe = await client.get(
            "/healthz", params={"ticket": "SECRETVALUE123", "token": "OTHERSECRET456"}
        )
        assert probe.status_code == 200, probe.text

    logs = stop_cleanly(server)
    entries = json_log(logs)
    assert_not_logged(
        logs, {**seen, "query ticket": "SECRETVALUE123", "query token": "OTHERSECRET456"}
    )
    access_lines = [
        e["msg"] for e in entries if e["logger"] == "uvicorn.access" and "/healthz" in e["msg"]
    ]
    assert any("ticket=" in line and "token=" in line for line in access_lines), (
        f"no access-log line for the /healthz probe (with its redacted query): {access_lines}"
    )
    assert any(e["logger"] == "uvicorn.access" and "/auth/login" in e["msg"] for e in entries)


async def test_errors_and_readiness_on_the_real_server(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}

        assert_error_shape(await client.get(f"{API}/no-such-thing"), 404, "not_found")
        assert_error_shape(await client.get("/no-such-thing"), 404, "not_found")
        wrong_method = await client.get(f"{API}/auth/login")
        assert_error_shape(wrong_method, 405, "method_not_allowed")

        malformed = await client.post(
            f"{API}/auth/login",
            content=b"{bad json",
            headers={"content-type": "application/json"},
        )
        body = assert_error_shape(malformed, 422, "invalid")
        assert isinstance(body.get("errors"), list), body
        assert body["errors"], body
        for error in body["errors"]:
            assert set(error) == {"loc", "msg", "type"}, error

        long_password = "Secret-Password-" + "x" * 200
        invalid = await client.post(
            f"{API}/auth/signup", json={"username": "ok_name", "password": long_password}
        )
        body = assert_error_shape(invalid, 422, "invalid")
        assert any(error["loc"][-1] == "password" for error in body["errors"]), body
        assert "Secret-Password" not in invalid.text, "a rejected password is echoed back"

    logs = stop_cleanly(server)
    json_log(logs)
    assert "Secret-Password" not in logs


def test_unreachable_database_keeps_liveness_and_fails_readiness(tmp_path: Path) -> None:
    db_password = "DBPASSWORD" + secrets.token_hex(8)
    server = ServerProcess(
        env={
            "DATABASE_URL": f"postgresql://postgres:{db_password}@127.0.0.1:1/none",
            "AUTO_MIGRATE": "false",
            "JWT_SECRET": TEST_JWT_SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "DEBUG",
        },
        port=free_port(),
        workdir=tmp_path,
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            live = client.get("/healthz")
            assert live.status_code == 200, live.text
            assert live.json()["status"] == "ok"
            started = time.monotonic()
            ready = client.get("/readyz")
            assert time.monotonic() - started < 5, "readiness waited too long on a dead database"
            body = assert_error_shape(ready, 503, "unavailable")
            assert body["checks"]["database"] == "unavailable", body
            # A request that needs storage says so, in the contract's shape, with no trace.
            login = client.post(
                f"{API}/auth/login", json={"username": "nobody", "password": "whatever-123"}
            )
            assert_error_shape(login, 503, "unavailable")
            assert login.headers.get("retry-after", "").isdigit(), login.headers
    except BaseException:
        server.stop()  # the failure above is the one to report
        raise
    logs = stop_cleanly(server)
    entries = json_log(logs)
    assert any(e["level"] == "warning" and "readiness" in e["msg"] for e in entries), logs
    assert_not_logged(logs, {"database password": db_password})


def test_embedded_default_creates_and_reuses_data_and_secret(tmp_path: Path) -> None:
    """No DATABASE_URL, JWT_SECRET or DATA_DIR: SQLite and a generated secret under ./data."""
    password = f"pw-{secrets.token_urlsafe(18)}"

    def embedded() -> IsolatedServerProcess:
        return IsolatedServerProcess(
            unset=EMBEDDED_DEFAULT_UNSET,
            env={"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"},
            port=free_port(),
            workdir=tmp_path,
        )

    first = embedded()
    assert not leftover_env(first), "the server's environment still names a default's variable"
    first.start()
    try:
        database = tmp_path / "data" / "chat.db"
        secret_file = tmp_path / "data" / "jwt-secret"
        assert database.is_file(), list(tmp_path.rglob("*"))
        assert secret_file.is_file(), list(tmp_path.rglob("*"))
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, oct(secret_file.stat().st_mode)
        secret = secret_file.read_text().strip()
        assert len(secret.encode()) >= 32

        with httpx.Client(base_url=first.url, timeout=10) as client:
            signup = client.post(
                f"{API}/auth/signup", json={"username": "embedded_user", "password": password}
            )
            assert signup.status_code == 201, signup.text
            token = signup.json()["access_token"]
            user_id = signup.json()["user"]["id"]
            me = client.get(f"{API}/users/me", headers=bearer(token))
            assert me.status_code == 200, me.text
            assert me.json()["id"] == user_id
            ready = client.get("/readyz").json()
            assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    except BaseException:
        first.stop()  # the failure above is the one to report
        raise
    first_logs = stop_cleanly(first)

    entries = json_log(first_logs)
    warnings = [e for e in entries if e["level"] == "warning" and "JWT_SECRET" in e["msg"]]
    assert warnings, f"no warning about the missing JWT_SECRET:\n{first_logs}"
    assert_not_logged(first_logs, {"jwt secret": secret, "password": password, "token": token})

    second = embedded()
    second.start()
    try:
        assert secret_file.read_text().strip() == secret, "the development secret changed"
        with httpx.Client(base_url=second.url, timeout=10) as client:
            me = client.get(f"{API}/users/me", headers=bearer(token))
            assert me.status_code == 200, f"a first-run token fails after restart: {me.text}"
            assert me.json()["id"] == user_id
            login = client.post(
                f"{API}/auth/login", json={"username": "embedded_user", "password": password}
            )
            assert login.status_code == 200, login.text
            assert login.json()["user"]["id"] == user_id
    except BaseException:
        second.stop()  # the failure above is the one to report
        raise
    second_logs = stop_cleanly(second)
    json_log(second_logs)
    assert_not_logged(second_logs, {"jwt secret": secret, "password": password})


def leftover_env(server: ServerProcess) -> list[str]:
    names = set(EMBEDDED_DEFAULT_UNSET)
    return [key for key in server._env if key.upper() in names]


def test_the_served_app_freezes_start_up_objects_and_collects_young_ones_less_often(
    tmp_path: Path,
) -> None:
    # What uvicorn's workers call; run in a child, as it changes the whole process's collector.
    script = (
        "import gc, json; from chat_service.app import app_factory; "
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()[0]])); app_factory(); "
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()[0]]))"
    )
    env = {
        **os.environ,
        "JWT_SECRET": TEST_JWT_SECRET,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = (json.loads(line) for line in done.stdout.splitlines())
    assert before == [0, 700], before  # CPython's defaults
    frozen, young_threshold = after
    assert frozen > 50_000, after  # modules, routes and schemas: ~140,000 objects
    assert young_threshold == GC_YOUNG_THRESHOLD
