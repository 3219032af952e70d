"""Rate limits on the `limits` async API: in-process (memory://) or shared (redis://).

HTTP answers carry the IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy: "<name>";q=<quota>;w=<window s>`` and
``RateLimit: "<name>";r=<remaining>;t=<seconds until reset>``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError as LimitsStorageError
from limits.storage import storage_from_string
from redis.exceptions import RedisError

from chat_service.errors import RateLimited
from chat_service.metrics import Metrics, detached

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    name: str
    item: RateLimitItem

    @classmethod
    def parse(cls, name: str, spec: str) -> Rule:
        """`spec` is the `limits` notation, e.g. "5/15 minutes" or "20/minute"."""
        return cls(name, parse(spec))

    @property
    def policy_header(self) -> str:
        return f'"{self.name}";q={self.item.amount};w={self.item.get_expiry()}'


@dataclass(frozen=True)
class Usage:
    rule: Rule
    remaining: int
    reset_in_s: int

    @property
    def header(self) -> str:
        return f'"{self.rule.name}";r={self.remaining};t={self.reset_in_s}'


def rate_limit_headers(usages: list[Usage]) -> dict[str, str]:
    if not usages:
        return {}
    return {
        "RateLimit-Policy": ", ".join(usage.rule.policy_header for usage in usages),
        "RateLimit": ", ".join(usage.header for usage in usages),
    }


# What a shared counter store that is down or slow looks like.
STORAGE_FAILURES = (RedisError, LimitsStorageError, OSError, TimeoutError)


class RateLimiter:
    """Counters in the configured storage; while a shared one is unreachable, each process
    counts on its own (limits stay in force, per process) rather than failing requests."""

    def __init__(self, storage_url: str, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or detached()
        options = {"implementation": "redispy"} if "redis" in storage_url.split(":", 1)[0] else {}
        storage = storage_from_string(_async_scheme(storage_url), **options)
        assert isinstance(storage, Storage)
        self.storage = storage
        self._strategy = MovingWindowRateLimiter(self.storage)
        self._fallback = MovingWindowRateLimiter(MemoryStorage())

    async def usage(self, rule: Rule, key: str) -> Usage:
        try:
            stats = await self._strategy.get_window_stats(rule.item, rule.name, key)
        except STORAGE_FAILURES as exc:
            _warn_fallback(exc)
            stats = await self._fallback.get_window_stats(rule.item, rule.name, key)
        reset_in = max(0, math.ceil(stats.reset_time - time.time()))
        return Usage(rule, stats.remaining, reset_in)

    async def ensure_allowed(self, rule: Rule, key: str) -> Usage:
        """Raise RateLimited when `key` has used up `rule`, without counting this call."""
        usage = await self.usage(rule, key)
        if usage.remaining <= 0:
            self._metrics.rate_limited.labels(rule.name).inc()
            raise _refusal(usage)
        return usage

    async def allow(self, rule: Rule, key: str) -> bool:
        """Count one event if `rule` still allows it for `key` (one round trip, no headers)."""
        try:
            allowed = await self._strategy.hit(rule.item, rule.name, key)
        except STORAGE_FAILURES as exc:
            _warn_fallback(exc)
            allowed = await self._fallback.hit(rule.item, rule.name, key)
        if not allowed:
            self._metrics.rate_limited.labels(rule.name).inc()
        return allowed

    async def hit(self, rule: Rule, key: str) -> Usage:
        """Count one event against `rule` for `key`; raise RateLimited if it was one too many."""
        allowed = await self.allow(rule, key)
        usage = await self.usage(rule, key)
        if not allowed:
            raise _refusal(usage)
        return usage

    async def refusal(self, rule: Rule, key: str) -> RateLimited:
        """The error for an event `allow` has just refused, saying when to retry."""
        return _refusal(await self.usage(rule, key))


def _refusal(usage: Usage) -> RateLimited:
    return RateLimited(usage.reset_in_s or 1, rate_limit_headers([usage]))


def _warn_fallback(exc: BaseException) -> None:
    log.warning(
        "rate-limit storage unavailable; counting in this process", extra={"error": repr(exc)}
    )


def _async_scheme(url: str) -> str:
    return url if url.startswith("async+") else f"async+{url}"
