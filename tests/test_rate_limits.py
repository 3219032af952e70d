"""Signup and login rate limits: 429 with Retry-After and the IETF RateLimit headers."""

from __future__ import annotations

import re

import httpx

from tests.conftest import AppFactory, client_for
from tests.helpers import API, PASSWORD, signup

POLICY = re.compile(r'^"(?P<name>[a-z-]+)";q=(?P<q>\d+);w=(?P<w>\d+)$')
USAGE = re.compile(r'^"(?P<name>[a-z-]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')


def parse_list(header: str, pattern: re.Pattern[str]) -> dict[str, dict[str, int]]:
    items = {}
    for part in header.split(", "):
        match = pattern.match(part)
        assert match, f"malformed item {part!r} in {header!r}"
        fields = match.groupdict()
        name = fields.pop("name")
        items[name] = {key: int(value) for key, value in fields.items()}
    return items


def assert_limited(response: httpx.Response, window_s: int) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "rate_limited"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= window_s


async def bad_login(client: httpx.AsyncClient, username: str) -> httpx.Response:
    return await client.post(
        f"{API}/auth/login", json={"username": username, "password": "wrong password"}
    )


async def test_signup_is_limited_per_ip(app_factory: AppFactory) -> None:
    app = await app_factory(signup_ip_limit="3/hour")
    async with client_for(app, "203.0.113.7") as client:
        for n in range(3):
            response = await client.post(
                f"{API}/auth/signup", json={"username": f"user{n}", "password": PASSWORD}
            )
            assert response.status_code == 201
            assert parse_list(response.headers["RateLimit-Policy"], POLICY) == {
                "signup-ip": {"q": 3, "w": 3600}
            }
            usage = parse_list(response.headers["RateLimit"], USAGE)["signup-ip"]
            assert usage["r"] == 2 - n
            assert 0 < usage["t"] <= 3600
        refused = await client.post(
            f"{API}/auth/signup", json={"username": "user9", "password": PASSWORD}
        )
        assert_limited(refused, 3600)
        assert parse_list(refused.headers["RateLimit"], USAGE)["signup-ip"]["r"] == 0
    async with client_for(app, "203.0.113.8") as other_ip:
        await signup(other_ip, "user9")


async def test_failed_logins_are_limited_per_account(app_factory: AppFactory) -> None:
    app = await app_factory()  # the contract's default: 5 failures per 15 minutes
    async with client_for(app, "198.51.100.1") as client:
        await signup(client, "target")
    for attempt in range(5):  # from five different addresses: the account limit is global
        async with client_for(app, f"198.51.100.{10 + attempt}") as client:
            response = await bad_login(client, "TARGET")
            assert response.status_code == 401
            usage = parse_list(response.headers["RateLimit"], USAGE)
            assert usage["login-account"]["r"] == 4 - attempt
    async with client_for(app, "198.51.100.99") as client:
        # Now even the right password is refused until the window moves on...
        right = await client.post(
            f"{API}/auth/login", json={"username": "target", "password": PASSWORD}
        )
        assert_limited(right, 900)
        assert parse_list(right.headers["RateLimit-Policy"], POLICY)["login-account"] == {
            "q": 5,
            "w": 900,
        }
        # ...while other accounts are unaffected.
        assert (await bad_login(client, "someone-else")).status_code == 401


async def test_failed_logins_are_limited_per_ip(app_factory: AppFactory) -> None:
    app = await app_factory(login_ip_limit="4/minute")
    async with client_for(app, "192.0.2.50") as attacker:
        for n in range(4):  # many accounts, one address
            assert (await bad_login(attacker, f"victim{n}")).status_code == 401
        assert_limited(await bad_login(attacker, "victim9"), 60)
    async with client_for(app, "192.0.2.51") as bystander:
        assert (await bad_login(bystander, "victim9")).status_code == 401


async def test_successful_logins_do_not_count(app_factory: AppFactory) -> None:
    app = await app_factory(login_account_limit="2/minute", login_ip_limit="2/minute")
    async with client_for(app) as client:
        await signup(client, "regular")
        for _ in range(5):
            response = await client.post(
                f"{API}/auth/login", json={"username": "regular", "password": PASSWORD}
            )
            assert response.status_code == 200
            usage = parse_list(response.headers["RateLimit"], USAGE)
            assert usage == {
                "login-ip": {"r": 2, "t": usage["login-ip"]["t"]},
                "login-account": {"r": 2, "t": usage["login-account"]["t"]},
            }


async def test_oauth2_form_shares_the_login_limits(app_factory: AppFactory) -> None:
    app = await app_factory(login_account_limit="2/minute")
    async with client_for(app) as client:
        await signup(client, "formuser")
        for _ in range(2):
            form = {"username": "formuser", "password": "nope-nope"}
            assert (await client.post(f"{API}/auth/token", data=form)).status_code == 401
        assert_limited(await bad_login(client, "formuser"), 60)


async def test_cors_exposes_rate_limit_headers(app_factory: AppFactory) -> None:
    app = await app_factory(cors_origins=["https://chat.example"])
    async with client_for(app) as client:
        response = await client.post(
            f"{API}/auth/signup",
            json={"username": "corsy", "password": PASSWORD},
            headers={"Origin": "https://chat.example"},
        )
        assert response.status_code == 201
        assert response.headers["Access-Control-Allow-Origin"] == "https://chat.example"
        exposed = {
            h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")
        }
        assert {"retry-after", "ratelimit", "ratelimit-policy"} <= exposed
        preflight = await client.options(
            f"{API}/auth/login",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
            },
        )
        assert "Access-Control-Allow-Origin" not in preflight.headers
