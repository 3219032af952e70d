"""Signup and login rate limits: 429 with Retry-After and the IETF RateLimit headers; the
limiter itself: the in-process moving window (memory://, and the fallback while Redis is
down) against the shared one on Redis."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from chat_service.errors import RateLimited
from chat_service.ratelimit import LocalWindows, RateLimiter, Rule
from tests.conftest import AppFactory, client_for
from tests.helpers import API, PASSWORD, signup

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

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


# --- the limiter itself -----------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unique_key() -> str:
    return f"key-{secrets.token_hex(8)}"  # the shared Redis is never flushed


def closed_port_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.mark.backend_independent(suite="postgres")
async def test_in_process_window_edges() -> None:
    clock = Clock()
    limiter = RateLimiter("memory://", clock=clock)
    rule = Rule.parse("edge", "3/10 seconds")
    for remaining in (2, 1, 0):
        assert (await limiter.hit(rule, "k")).remaining == remaining
    assert not await limiter.allow(rule, "k")
    clock.now += 4
    usage = await limiter.usage(rule, "k")
    assert (usage.remaining, usage.reset_in_s) == (0, 6)
    clock.now += 6  # exactly one window old: still counts, as on Redis
    assert not await limiter.allow(rule, "k")
    assert (await limiter.usage(rule, "k")).remaining == 0
    clock.now += 0.001
    usage = await limiter.usage(rule, "k")
    assert (usage.remaining, usage.reset_in_s) == (3, 10)  # an empty window: a full one ahead


@pytest.mark.backend_independent(suite="postgres")
async def test_in_process_window_moves_and_refusals_do_not_count() -> None:
    clock = Clock()
    limiter = RateLimiter("memory://", clock=clock)
    rule = Rule.parse("moving", "3/10 seconds")
    for step in (0, 4, 4):  # events at 1000, 1004, 1008
        clock.now += step
        assert await limiter.allow(rule, "a")
        assert await limiter.allow(rule, "b")
    for _ in range(50):
        assert not await limiter.allow(rule, "a")
    clock.now = 1010.7  # only the event at 1000 has left the window
    usage = await limiter.usage(rule, "a")
    assert (usage.remaining, usage.reset_in_s) == (1, 4)  # 1004 + 10 - 1010.7, rounded up
    assert await limiter.allow(rule, "a")
    with pytest.raises(RateLimited) as refused:
        await limiter.hit(rule, "a")
    assert refused.value.retry_after == 4
    assert refused.value.headers == {
        "RateLimit-Policy": '"moving";q=3;w=10',
        "RateLimit": '"moving";r=0;t=4',
        "Retry-After": "4",
    }
    clock.now = 1014.0  # "b" untouched since 1008: 1000 has left, 1004 is just in
    usage = await limiter.usage(rule, "b")
    assert (usage.remaining, usage.reset_in_s) == (1, 0)
    assert (await limiter.usage(rule, "other")).remaining == 3  # keys are apart...
    assert (await limiter.usage(Rule.parse("moving", "5/10 seconds"), "a")).remaining == 5
    # ...and so are rules


@pytest.mark.backend_independent(suite="postgres")
async def test_ensure_allowed_does_not_count() -> None:
    limiter = RateLimiter("memory://", clock=Clock())
    rule = Rule.parse("check", "2/minute")
    for _ in range(5):
        assert (await limiter.ensure_allowed(rule, "k")).remaining == 2
    await limiter.hit(rule, "k")
    await limiter.hit(rule, "k")
    with pytest.raises(RateLimited) as refused:
        await limiter.ensure_allowed(rule, "k")
    assert refused.value.retry_after == 60


@pytest.mark.backend_independent(suite="postgres")
def test_idle_keys_are_forgotten_as_distinct_keys_stream_in() -> None:
    clock = Clock()
    windows = LocalWindows(clock)
    rule = Rule.parse("signup-ip", "2/second")
    most = 0
    regular = 0
    for n in range(200_000):  # a new address every millisecond: ~1,000 within a window...
        clock.now += 0.001
        assert windows.acquire(rule, f"ip{n}")
        regular += windows.acquire(rule, "regular")  # ...and one that never goes idle
        most = max(most, len(windows))
    assert most <= 1_100
    assert regular >= 2 * 199  # about twice per second over 200 s: it stayed in use


@pytest.mark.backend_independent(suite="postgres")
def test_a_burst_of_keys_is_forgotten_a_few_per_hit() -> None:
    clock = Clock()
    windows = LocalWindows(clock)
    rule = Rule.parse("signup-ip", "2/second")
    for n in range(50_000):
        windows.acquire(rule, f"ip{n}")
    assert len(windows) == 50_000
    clock.now += 1.5
    hits = 0
    while len(windows) > 1 and hits < 50_000:
        windows.acquire(rule, "regular")
        hits += 1
    assert len(windows) == 1
    assert 50_000 / 100 < hits < 50_000 / 4  # bounded work per hit, more than a hit can add


async def count_threads_and_offloads(
    monkeypatch: pytest.MonkeyPatch, body: Callable[[], Any]
) -> tuple[int, int]:
    offloads = 0
    to_thread = asyncio.to_thread

    async def counting_to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nonlocal offloads
        offloads += 1
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    threads = threading.active_count()
    await body()
    return threading.active_count() - threads, offloads


@pytest.mark.backend_independent(suite="postgres")
async def test_in_process_counting_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = RateLimiter("memory://")
    rule = Rule.parse("messages", "20/2 seconds")

    async def hits() -> None:
        for n in range(10_000):
            await limiter.allow(rule, f"user{n % 1_000}")
            await limiter.usage(rule, f"user{n % 1_000}")
            await asyncio.sleep(0)  # lets anything the limiter scheduled run

    assert await count_threads_and_offloads(monkeypatch, hits) == (0, 0)


@pytest.mark.backend_independent(suite="postgres")
async def test_counts_in_process_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter(closed_port_url())
    rule = Rule.parse("fallback", "2/minute")
    assert (await limiter.usage(rule, "k")).remaining == 2
    assert (await limiter.hit(rule, "k")).remaining == 1
    assert (await limiter.hit(rule, "k")).remaining == 0
    assert not await limiter.allow(rule, "k")
    refusal = await limiter.refusal(rule, "k")
    assert 59 <= refusal.retry_after <= 60
    with pytest.raises(RateLimited):
        await limiter.ensure_allowed(rule, "k")
    assert "rate-limit storage unavailable; counting in this process" in caplog.messages


@pytest.mark.backend_independent(suite="postgres")
async def test_redis_counts_are_shared_and_match_in_process_ones() -> None:
    first, second = RateLimiter(REDIS_URL), RateLimiter(REDIS_URL)
    local = RateLimiter("memory://")
    rule = Rule.parse("shared", "3/minute")
    key = unique_key()
    seen = []
    for limiter in (first, second, first, second):
        seen.append((await limiter.allow(rule, key), await limiter.usage(rule, key)))
    expected = []
    for _ in range(4):
        expected.append((await local.allow(rule, key), await local.usage(rule, key)))
    assert [(allowed, usage.remaining) for allowed, usage in seen] == [
        (True, 2),
        (True, 1),
        (True, 0),
        (False, 0),
    ]
    assert [(allowed, usage.remaining) for allowed, usage in expected] == [
        (allowed, usage.remaining) for allowed, usage in seen
    ]
    assert {usage.reset_in_s for _, usage in seen + expected} == {60}
    fresh = unique_key()
    assert await first.usage(rule, fresh) == await local.usage(rule, fresh)
