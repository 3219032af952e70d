"""Schemathesis against the app's own OpenAPI document, over a real server.

Every operation gets generated requests (Schemathesis' examples, coverage and fuzzing phases:
valid and invalid input alike), once without credentials and once with a valid bearer token.
Every response must not be a 5xx, must have a status code the document declares for the
operation, the declared content type, and a body and headers that match the declared schemas.
With the token, an operation that requires one must also refuse the same request without it.

The server is a real `chat-service serve` process on a database of its own (so this module's
writes never reach other tests), with rate limits too generous to answer 429: the run measures
the API, not the limiter. Generation is derandomized with a fixed seed, so CI is reproducible.
A failure prints the response and a curl command that reproduces it (the token is filtered out).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chat_service.app import create_app
from chat_service.db import migrate
from chat_service.settings import Settings
from tests.conftest import ephemeral_postgres
from tests.helpers import API, PASSWORD, TEST_JWT_SECRET, ServerProcess, bearer, free_port

pytestmark = pytest.mark.backend_independent(suite="postgres")  # see tests/conftest.py

MAX_EXAMPLES = 20  # per operation and run, for the fuzzing phase (coverage cases come on top)
SEED = 20_260_101
GENEROUS_LIMITS = {
    "LOGIN_ACCOUNT_LIMIT": "100000/minute",
    "LOGIN_IP_LIMIT": "100000/minute",
    "SIGNUP_IP_LIMIT": "100000/minute",
    "MESSAGE_RATE_PER_S": "100000",
    "MESSAGE_BURST": "100000",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,  # no example database: a run does not depend on the previous ones
    # The server and the account are shared by an operation's examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# The document the app itself serves (tests/test_openapi.py keeps openapi/openapi.json equal).
schema = schemathesis.openapi.from_dict(
    create_app(Settings(jwt_secret=TEST_JWT_SECRET)).openapi(),
    config=SchemathesisConfig(seed=SEED),
)


@pytest.fixture(scope="module")
async def fuzz_database(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A migrated database for this module only, dropped at its end."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz-db') / 'chat.db'}"
        await asyncio.to_thread(migrate, url)
        yield url
        return
    async with ephemeral_postgres("fuzz") as url:
        await asyncio.to_thread(migrate, url)
        yield url


@pytest.fixture(scope="module")
def fuzz_server(
    fuzz_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("fuzz-server")
    env = {
        "DATABASE_URL": fuzz_database,
        "JWT_SECRET": TEST_JWT_SECRET,
        "AUTO_MIGRATE": "false",
        "LOG_FORMAT": "json",
        "DATA_DIR": str(workdir / "data"),
        **GENEROUS_LIMITS,
    }
    process = ServerProcess(env=env, port=free_port(), workdir=workdir)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def member_id(fuzz_server: ServerProcess) -> str:
    """Signs up the fuzzing account, and a second user to be a member of its rooms."""
    with httpx.Client(base_url=fuzz_server.url) as client:
        for username in ("fuzzer", "member"):
            response = client.post(
                f"{API}/auth/signup", json={"username": username, "password": PASSWORD}
            )
            assert response.status_code == 201, response.text
    return str(response.json()["user"]["id"])


@pytest.fixture
def known(fuzz_server: ServerProcess, member_id: str) -> dict[str, Any]:
    """For one operation: a fresh token (a generated logout must not end the others' session)
    and real path parameters: a public room of the account's, with a member and a message."""
    with httpx.Client(base_url=fuzz_server.url) as client:
        response = client.post(
            f"{API}/auth/login", json={"username": "fuzzer", "password": PASSWORD}
        )
        assert response.status_code == 200, response.text
        headers = bearer(response.json()["access_token"])
        response = client.post(f"{API}/rooms", json={"name": "fuzz"}, headers=headers)
        assert response.status_code == 201, response.text
        room_id = response.json()["id"]
        for path, body in (("members", {"username": "member"}), ("messages", {"body": "hi"})):
            response = client.post(f"{API}/rooms/{room_id}/{path}", json=body, headers=headers)
            assert response.status_code == 201, response.text
    return {"headers": headers, "room_id": room_id, "seq": 1, "user_id": member_id}


@SETTINGS
@schema.parametrize()
def test_api_without_credentials(case: Case[Any], fuzz_server: ServerProcess) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS)


@SETTINGS
@schema.parametrize()
@schema.given(use_known_ids=st.booleans())
def test_api_with_a_valid_token(
    case: Case[Any], use_known_ids: bool, fuzz_server: ServerProcess, known: dict[str, Any]
) -> None:
    # Random ids find nothing (404): real ones reach the success responses and their schemas.
    if use_known_ids:
        for name in case.path_parameters or {}:
            if name in known:
                case.path_parameters[name] = known[name]
    case.call_and_validate(
        base_url=fuzz_server.url, headers=known["headers"], checks=[*CHECKS, ignored_auth]
    )
