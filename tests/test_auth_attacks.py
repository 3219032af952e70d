"""Auth attack suite (issue 8, item 3): forged tokens, swapped token kinds, refresh-token reuse,
tickets, origins and brute force, against a real uvicorn over real sockets.

This file adds what the other suites leave out; the rest is covered there:
- the codec and GET /users/me against tampered, `alg: none`, other-HMAC, expired, wrong-claim
  and missing-claim tokens: tests/test_tokens.py (this file replays them at the WebSocket
  handshake and in `auth.refresh`, and adds the algorithm tricks below to REST too);
- refresh rotation and reuse over REST, login answers and timing for unknown vs known users:
  tests/test_auth.py;
- one ticket used twice or after expiry, the origin allowlist's basic tricks:
  tests/test_ws_protocol.py;
- per-account and per-IP login limits through the ASGI client: tests/test_rate_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import ConnectionClosed

from chat_service.security.tokens import REQUIRED_CLAIMS
from tests.conftest import AppFactory, LiveServerFactory, client_for
from tests.helpers import API, PASSWORD, TEST_JWT_SECRET, bearer, signup
from tests.test_tokens import (
    OTHER_SECRET,
    b64url,
    claims_for,
    forge,
    unsigned,
    with_flipped_signature,
    with_payload,
)
from tests.test_ws_protocol import Client, Harness, User, check_cases, parse_time, wait_until

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

HarnessFactory = Callable[..., Awaitable[Harness]]

ALLOWED_ORIGIN = "https://chat.example"
ME = f"{API}/users/me"


@pytest.fixture
async def harnesses(live_server_factory: LiveServerFactory) -> AsyncIterator[HarnessFactory]:
    """`make(**settings)`: a live uvicorn server with those settings and an HTTP client for it;
    every socket opened through it is closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Harness:
            server = await live_server_factory(**overrides)
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.http, timeout=30)
            )
            harness = Harness(server, http)
            stack.push_async_callback(harness.close_all)
            return harness

        yield make


@pytest.fixture
async def h(harnesses: HarnessFactory) -> Harness:
    return await harnesses(ws_allowed_origins=[ALLOWED_ORIGIN])


async def refused(client: Client, code: int, reason: str | None = None) -> None:
    """The server closes at once with `code` (and exactly `reason`), sending nothing before."""
    assert await client.expect_close(code) == []
    if reason is not None:
        assert client.close_reason == reason, client.close_reason


async def ticket_for(h: Harness, user: User) -> str:
    response = await h.http.post(f"{API}/auth/ws-ticket", headers=user.headers)
    assert response.status_code == 200, response.text
    return str(response.json()["ticket"])


# --- forging tokens -----------------------------------------------------------------------------

ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_PUBLIC_PEM = ATTACKER_RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
ATTACKER_SECRET = b"attacker-chosen-secret-" + b"z" * 32


def jws(claims: dict[str, Any], header: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS with exactly this header, signed by `sign` over `header.payload`."""
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    ).encode()
    return f"{signing_input.decode()}.{b64url(sign(signing_input))}"


def hmac_signer(key: bytes, digest: str = "sha256") -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(key, data, getattr(hashlib, digest)).digest()


def rs256(data: bytes) -> bytes:
    return ATTACKER_RSA.sign(data, padding.PKCS1v15(), hashes.SHA256())


def none_variant(claims: dict[str, Any], alg: str) -> str:
    return jws(claims, {"alg": alg, "typ": "JWT"}, lambda _data: b"")


def timed_claims(user: User, **moments: timedelta) -> dict[str, Any]:
    now = datetime.now(UTC)
    stamps = {name: int((now + offset).timestamp()) for name, offset in moments.items()}
    return claims_for(user.id, user.session_id, **stamps)


Forger = Callable[[User], str]


def without(claim: str) -> Forger:
    """A correctly signed token of the user that lacks `claim`."""
    return lambda u: forge(claims_for(u.id, u.session_id, **{claim: None}))


# Each forged access token, and the 4401 reason (docs/protocol.md §8) it must get.
FORGED: dict[str, tuple[Forger, str]] = {
    "tampered-signature": (lambda u: with_flipped_signature(u.token), "invalid_token"),
    "tampered-payload-exp": (
        lambda u: with_payload(u.token, exp=int(datetime.now(UTC).timestamp()) + 10**6),
        "invalid_token",
    ),
    "alg-none": (lambda u: unsigned(claims_for(u.id, u.session_id)), "invalid_token"),
    "alg-None": (lambda u: none_variant(claims_for(u.id, u.session_id), "None"), "invalid_token"),
    "alg-NONE": (lambda u: none_variant(claims_for(u.id, u.session_id), "NONE"), "invalid_token"),
    "alg-none-keeping-signature": (
        lambda u: ".".join(
            [b64url(b'{"alg":"none","typ":"JWT"}'), *u.token.split(".")[1:]],
        ),
        "invalid_token",
    ),
    "hs256-empty-key": (
        lambda u: jws(claims_for(u.id, u.session_id), {"alg": "HS256"}, hmac_signer(b"")),
        "invalid_token",
    ),
    "hs256-empty-key-kid-dev-null": (
        lambda u: jws(
            claims_for(u.id, u.session_id),
            {"alg": "HS256", "kid": "../../../../dev/null"},
            hmac_signer(b""),
        ),
        "invalid_token",
    ),
    "hs384-same-secret": (
        lambda u: forge(claims_for(u.id, u.session_id), algorithm="HS384"),
        "invalid_token",
    ),
    "hs512-same-secret": (
        lambda u: forge(claims_for(u.id, u.session_id), algorithm="HS512"),
        "invalid_token",
    ),
    "hs256-header-over-hs512-signature": (
        lambda u: jws(
            claims_for(u.id, u.session_id),
            {"alg": "HS256", "typ": "JWT"},
            hmac_signer(TEST_JWT_SECRET.encode(), "sha512"),
        ),
        "invalid_token",
    ),
    "rs256-attacker-key": (
        lambda u: jws(claims_for(u.id, u.session_id), {"alg": "RS256", "typ": "JWT"}, rs256),
        "invalid_token",
    ),
    "rs256-public-key-as-hmac-secret": (
        lambda u: jws(
            claims_for(u.id, u.session_id),
            {"alg": "HS256", "typ": "JWT"},
            hmac_signer(ATTACKER_PUBLIC_PEM),
        ),
        "invalid_token",
    ),
    "embedded-jwk": (
        lambda u: jws(
            claims_for(u.id, u.session_id),
            {"alg": "HS256", "jwk": {"kty": "oct", "k": b64url(ATTACKER_SECRET)}},
            hmac_signer(ATTACKER_SECRET),
        ),
        "invalid_token",
    ),
    "other-secret": (
        lambda u: forge(claims_for(u.id, u.session_id), secret=OTHER_SECRET),
        "invalid_token",
    ),
    "expired": (
        lambda u: forge(timed_claims(u, iat=timedelta(minutes=-20), exp=timedelta(minutes=-5))),
        "token_expired",
    ),
    "not-yet-valid": (
        lambda u: forge(timed_claims(u, nbf=timedelta(minutes=10))),
        "invalid_token",
    ),
    "wrong-aud": (
        lambda u: forge(claims_for(u.id, u.session_id, aud="another-service")),
        "invalid_token",
    ),
    "wrong-iss": (
        lambda u: forge(claims_for(u.id, u.session_id, iss="someone-else")),
        "invalid_token",
    ),
    "typ-refresh": (
        lambda u: forge(claims_for(u.id, u.session_id, typ="refresh")),
        "invalid_token",
    ),
    "typ-Access": (
        lambda u: forge(claims_for(u.id, u.session_id, typ="Access")),
        "invalid_token",
    ),
    **{f"missing-{claim}": (without(claim), "invalid_token") for claim in REQUIRED_CLAIMS},
    "refresh-token-as-access-token": (lambda u: u.refresh_token, "invalid_token"),
}

# Tricks test_tokens.py does not already play against REST.
NEW_ON_REST = [
    "alg-None",
    "alg-NONE",
    "alg-none-keeping-signature",
    "hs256-empty-key",
    "hs256-empty-key-kid-dev-null",
    "hs256-header-over-hs512-signature",
    "rs256-attacker-key",
    "rs256-public-key-as-hmac-secret",
    "embedded-jwk",
    "not-yet-valid",
    "typ-Access",
    "tampered-payload-exp",
]

ROUTES: dict[str, Callable[[str], dict[str, Any]]] = {
    "header": lambda token: {"headers": bearer(token)},
    "subprotocol": lambda token: {"headers": {}, "subprotocols": ["chat.v1", f"bearer.{token}"]},
}


# --- 1. forged access tokens --------------------------------------------------------------------


async def test_forged_access_tokens_are_refused_4401_at_the_handshake(h: Harness) -> None:
    alice = await h.signup("alice")
    for options in ROUTES.values():  # the genuine token passes both routes
        control = await h.connect(alice, **options(alice.token))
        await control.ping()
        await control.ws.close()

    async def check(case: tuple[str, str]) -> None:
        name, route = case
        forger, reason = FORGED[name]
        client = await h.open(**ROUTES[route](forger(alice)))
        await refused(client, 4401, reason)

    await check_cases([(name, route) for name in FORGED for route in ROUTES], check)
    assert h.hub.stats()["connections"] == 0


async def test_forged_tokens_cannot_extend_a_live_socket(h: Harness) -> None:
    """`auth.refresh` with a forged token of the same user (a later `exp` is the prize) gets
    `forbidden`, and the socket keeps its old expiry."""
    alice = await h.signup("alice")
    client = await h.connect(alice)
    expires_at = client.hello["expires_at"]

    async def check(name: str) -> None:
        token = FORGED[name][0](alice)
        await client.error({"type": "auth.refresh", "access_token": token}, "forbidden")
        await client.ping()

    await check_cases(FORGED, check)
    (connection,) = [c for c in h.hub.all_connections() if c.user_id == alice.id]
    assert connection.expires_at == parse_time(expires_at)


@pytest.mark.parametrize("name", NEW_ON_REST)
async def test_algorithm_tricks_are_refused_over_rest(app_factory: AppFactory, name: str) -> None:
    app = await app_factory()
    async with client_for(app) as client:
        body = await signup(client, "alice")
        user = User(
            id=body["user"]["id"],
            username="alice",
            token=body["access_token"],
            refresh_token=body["refresh_token"],
            summary={},
        )
        assert (await client.get(ME, headers=bearer(user.token))).status_code == 200
        response = await client.get(ME, headers=bearer(FORGED[name][0](user)))
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": "Invalid access token", "code": "invalid_token"}
    assert response.headers["www-authenticate"] == "Bearer"


# --- 2. token kinds are not interchangeable ----------------------------------------------------


async def test_token_kinds_are_not_interchangeable(h: Harness) -> None:
    alice = await h.signup("alice")
    ticket = await ticket_for(h, alice)
    cases: dict[str, dict[str, Any]] = {
        "refresh-token-as-ticket": {"path": f"/ws?ticket={alice.refresh_token}"},
        "access-token-as-ticket": {"path": f"/ws?ticket={alice.token}"},
        "ticket-as-bearer-header": {"headers": bearer(ticket)},
        "ticket-as-bearer-subprotocol": {"subprotocols": ["chat.v1", f"bearer.{ticket}"]},
    }

    async def check(name: str) -> None:
        options = dict(cases[name])
        client = await h.open(options.pop("path", "/ws"), **options)
        await refused(client, 4401)

    await check_cases(cases, check)
    response = await h.http.post(f"{API}/auth/refresh", json={"refresh_token": ticket})
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_token"
    # None of that used the ticket up: it still opens one socket, as alice.
    client = await h.connect(alice, f"/ws?ticket={ticket}", headers={})
    await client.ping()


# --- 3. refresh-token reuse ---------------------------------------------------------------------


async def test_refresh_token_reuse_revokes_the_session_and_closes_its_sockets(h: Harness) -> None:
    alice = await h.signup("alice")  # session 1
    laptop = await h.login(alice)  # session 2, same user
    ticket = await ticket_for(h, alice)
    by_header = await h.connect(alice)
    by_subprotocol = await h.connect(
        alice, headers={}, subprotocols=["chat.v1", f"bearer.{alice.token}"]
    )
    kept = await h.connect(laptop)

    rotated = await h.http.post(f"{API}/auth/refresh", json={"refresh_token": alice.refresh_token})
    assert rotated.status_code == 200, rotated.text
    await by_header.ping()  # a normal rotation ends nothing

    reused = await h.http.post(f"{API}/auth/refresh", json={"refresh_token": alice.refresh_token})
    assert reused.status_code == 401, reused.text
    assert reused.json()["code"] == "token_reused"
    for client in (by_header, by_subprotocol):
        await refused(client, 4401, "session revoked")
    await kept.ping()

    # Everything of session 1 is dead, on every route; session 2 is untouched.
    new_access = rotated.json()["access_token"]
    for options in (ROUTES["header"](new_access), ROUTES["subprotocol"](alice.token)):
        await refused(await h.open(**options), 4401, "session_revoked")
    await refused(await h.open(f"/ws?ticket={ticket}"), 4401)
    await kept.error({"type": "auth.refresh", "access_token": new_access}, "forbidden")
    await kept.ping()
    await wait_until(lambda: h.hub.stats()["connections"] == 1)
    assert h.hub.stats()["sessions"] == 1


# --- 4. tickets ---------------------------------------------------------------------------------


async def test_a_ticket_opens_one_socket_even_under_concurrent_handshakes(h: Harness) -> None:
    alice = await h.signup("alice")
    ticket = await ticket_for(h, alice)
    clients = await asyncio.gather(*(h.open(f"/ws?ticket={ticket}") for _ in range(8)))
    outcomes: list[str | int | None] = []
    for client in clients:
        try:
            frame = await client.recv()
            assert frame["user"] == alice.summary
            outcomes.append(frame["type"])
        except ConnectionClosed as exc:
            outcomes.append(exc.rcvd.code if exc.rcvd else None)
    assert sorted(outcomes, key=str) == [4401] * 7 + ["hello"], outcomes
    assert h.hub.stats()["connections"] == 1


async def test_a_ticket_dies_with_its_session(h: Harness) -> None:
    """Alice logs out; her unused ticket, presented by anyone (bob here), is refused."""
    alice, bob = await h.signup("alice"), await h.signup("bob")
    ticket = await ticket_for(h, alice)
    response = await h.http.post(
        f"{API}/auth/logout", json={"refresh_token": alice.refresh_token}, headers=alice.headers
    )
    assert response.status_code == 204, response.text
    await refused(await h.open(f"/ws?ticket={ticket}"), 4401)
    assert h.hub.connections_of(alice.id) == 0
    await h.connect(bob)  # bob's own credentials still work


async def test_a_ticket_never_lends_its_identity(h: Harness) -> None:
    """Credentials are checked in the documented order (header, subprotocol, ticket): bob's
    header with alice's ticket is bob, and the ticket stays alice's, for alice."""
    alice, bob = await h.signup("alice"), await h.signup("bob")
    ticket = await ticket_for(h, alice)
    as_bob = await h.connect(bob, f"/ws?ticket={ticket}")
    assert as_bob.hello["user"] == bob.summary
    as_alice = await h.connect(alice, f"/ws?ticket={ticket}", headers={})
    assert as_alice.hello["user"] == alice.summary


async def test_a_tampered_ticket_is_refused_and_burns_nothing(h: Harness) -> None:
    alice = await h.signup("alice")
    ticket = await ticket_for(h, alice)
    flipped = ticket[:-1] + ("A" if ticket[-1] != "A" else "B")
    for fake in (flipped, ticket[:-1], ticket + "A", ticket.swapcase(), f"{ticket}%20"):
        await refused(await h.open(f"/ws?ticket={fake}"), 4401)
    await h.connect(alice, f"/ws?ticket={ticket}", headers={})


async def test_a_ticket_of_a_disabled_user_is_refused_4403(h: Harness, engine: AsyncEngine) -> None:
    alice = await h.signup("alice")
    ticket = await ticket_for(h, alice)
    async with engine.begin() as db:
        await db.execute(
            sa.text("UPDATE users SET disabled = :yes WHERE id = :id"),
            {"yes": True, "id": alice.id},
        )
    await refused(await h.open(f"/ws?ticket={ticket}"), 4403, "account_disabled")


async def test_a_ticket_from_a_foreign_origin_is_refused_4403(h: Harness) -> None:
    alice = await h.signup("alice")
    ticket = await ticket_for(h, alice)
    client = await h.open(f"/ws?ticket={ticket}", origin="https://evil.example")
    await refused(client, 4403, "origin not allowed")
    assert h.hub.stats()["connections"] == 0


# --- 5. origins ---------------------------------------------------------------------------------

# Beyond tests/test_ws_protocol.py's REFUSED_ORIGINS (suffix, subdomain, prefix, case, port,
# scheme, trailing slash, null, empty, same host on another port).
MORE_REFUSED_ORIGINS = [
    "https://chat.example.",  # trailing dot: the same host to DNS, not to an exact match
    "https://chat.example:443",  # the default port spelled out: browsers never send it
    "https://chat.example@evil.example",  # userinfo
    "https://chat.example%2eevil.example",
    "https://chat.example.evil.example",
    "https://evilchat.example",
    "https://chat.example https://evil.example",  # RFC 6454 origin list
    "https://chat.example,https://evil.example",
    "wss://chat.example",
    "chrome-extension://chat.example",
    "file://",
    "NULL",
    "http://localhost:<port>",  # this server under another name
    "http://127.0.0.1",  # this host, no port
    "https://127.0.0.1:<port>",  # this server, other scheme
]


async def test_more_origin_tricks_are_refused_4403(h: Harness) -> None:
    alice = await h.signup("alice")
    allowed = await h.connect(alice, origin=ALLOWED_ORIGIN)  # control: the allowlist works
    await allowed.ping()

    async def check(origin: str) -> None:
        origin = origin.replace("<port>", str(h.server.port))
        client = await h.open(headers={**alice.headers, "Origin": origin})
        await refused(client, 4403, "origin not allowed")

    await check_cases(MORE_REFUSED_ORIGINS, check)
    # A foreign page authenticating the browser way is refused just the same.
    client = await h.open(**ROUTES["subprotocol"](alice.token), origin="https://evil.example")
    await refused(client, 4403, "origin not allowed")
    assert h.hub.stats()["connections"] == 1


# --- 6. brute force -----------------------------------------------------------------------------


def error_of(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    return response.status_code, response.json()


async def bad_login(client: httpx.AsyncClient, username: str) -> httpx.Response:
    return await client.post(
        f"{API}/auth/login", json={"username": username, "password": "wrong password!"}
    )


async def test_login_limits_do_not_reveal_which_accounts_exist(app_factory: AppFactory) -> None:
    """The per-account limit counts unknown names like real ones: an attacker cannot tell them
    apart by when (or how) the 429 comes."""
    app = await app_factory()
    async with client_for(app, "198.51.100.1") as client:
        await signup(client, "known")
    trails: dict[str, list[tuple[int, str, str]]] = {}
    for username in ("known", "ghost"):
        trail = []
        for attempt in range(6):  # each from its own address: only the account limit counts
            async with client_for(app, f"198.51.{100 + attempt}.{len(trails) + 7}") as client:
                response = await bad_login(client, username)
            account_usage = response.headers["RateLimit"].split(", ")[-1]
            trail.append((response.status_code, response.json()["code"], account_usage))
            if attempt == 5:
                assert response.headers.keys() >= {"retry-after", "ratelimit", "ratelimit-policy"}
        trails[username] = trail
    statuses = [(status, code) for status, code, _ in trails["known"]]
    assert statuses == [(401, "invalid_credentials")] * 5 + [(429, "rate_limited")]
    assert [usage.split(";t=")[0] for *_, usage in trails["known"]] == [
        usage.split(";t=")[0] for *_, usage in trails["ghost"]
    ]
    assert [row[:2] for row in trails["ghost"]] == statuses


def from_address(base_url: str, local_address: str) -> httpx.AsyncClient:
    """A client whose TCP connections come from `local_address` (any 127.x.y.z is loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=30)


SPOOFED_HEADERS: list[Callable[[int], dict[str, str]]] = [
    lambda n: {"X-Forwarded-For": f"203.0.113.{n}"},
    lambda n: {"X-Forwarded-For": f"203.0.113.{n}, 127.0.0.1"},
    lambda n: {"Forwarded": f"for=203.0.113.{n}"},
    lambda n: {"X-Real-IP": f"203.0.113.{n}"},
    lambda n: {"X-Forwarded-For": f"198.51.100.{n}", "X-Forwarded-Proto": "https"},
]


async def test_forwarded_headers_do_not_dodge_per_ip_limits(
    live_server_factory: LiveServerFactory,
) -> None:
    """With the default settings only 127.0.0.1 is a trusted proxy. A client elsewhere (here
    127.0.0.2) that rotates X-Forwarded-For and friends is still one address to the per-IP login
    limit (20/minute) and the signup limit (10/hour)."""
    live = await live_server_factory()
    async with from_address(live.http, "127.0.0.2") as attacker:
        for n in range(20):  # 20 accounts, so the per-account limit never trips
            headers = SPOOFED_HEADERS[n % len(SPOOFED_HEADERS)](n)
            response = await attacker.post(
                f"{API}/auth/login",
                json={"username": f"victim{n}", "password": "wrong password!"},
                headers=headers,
            )
            assert error_of(response)[0] == 401, response.text
        limited = await attacker.post(
            f"{API}/auth/login",
            json={"username": "victim99", "password": "wrong password!"},
            headers={"X-Forwarded-For": "192.0.2.200"},
        )
        assert error_of(limited)[0] == 429, limited.text
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60

        for n in range(10):
            response = await attacker.post(
                f"{API}/auth/signup",
                json={"username": f"farm{n}", "password": PASSWORD},
                headers=SPOOFED_HEADERS[n % len(SPOOFED_HEADERS)](n),
            )
            assert response.status_code == 201, response.text
        farmed = await attacker.post(
            f"{API}/auth/signup",
            json={"username": "farm99", "password": PASSWORD},
            headers={"X-Forwarded-For": "192.0.2.201"},
        )
        assert error_of(farmed)[0] == 429, farmed.text
        assert farmed.json()["code"] == "rate_limited"

    # The control: through the trusted proxy the forwarded address is the client, so the same
    # rotation spreads over many per-IP budgets, while the per-account limit (5 per 15 minutes)
    # still stops a brute force on one account from many addresses.
    async with from_address(live.http, "127.0.0.1") as proxy:
        for n in range(25):
            response = await proxy.post(
                f"{API}/auth/login",
                json={"username": f"other{n}", "password": "wrong password!"},
                headers={"X-Forwarded-For": f"203.0.113.{n}"},
            )
            assert response.status_code == 401, response.text
        statuses = []
        for n in range(6):
            response = await proxy.post(
                f"{API}/auth/login",
                json={"username": "target", "password": "wrong password!"},
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            )
            statuses.append(response.status_code)
        assert statuses == [401] * 5 + [429]
