"""Rate limits: in-process (memory://, counted here) or shared (redis://, `limits` async API).

HTTP answers carry the IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy: "<name>";q=<quota>;w=<window s>`` and
``RateLimit: "<name>";r=<remaining>;t=<seconds until reset>``.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
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

    def __init__(
        self,
        storage_url: str,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics or detached()
        # memory:// is counted by `LocalWindows`, not by `limits`' async MemoryStorage: that one
        # runs a pass over every key after each hit, with a thread round trip per key.
        self._shared = None if _is_in_process(storage_url) else _shared_strategy(storage_url)
        self._local = LocalWindows(clock)

    @property
    def shared(self) -> bool:
        """Counters in a shared store: each count is a network round trip."""
        return self._shared is not None

    async def usage(self, rule: Rule, key: str) -> Usage:
        if self._shared is not None:
            try:
                stats = await self._shared.get_window_stats(rule.item, rule.name, key)
            except STORAGE_FAILURES as exc:
                _warn_fallback(exc)
            else:
                reset_in = max(0, math.ceil(stats.reset_time - time.time()))
                return Usage(rule, stats.remaining, reset_in)
        return self._local.usage(rule, key)

    async def ensure_allowed(self, rule: Rule, key: str) -> Usage:
        """Raise RateLimited when `key` has used up `rule`, without counting this call."""
        usage = await self.usage(rule, key)
        if usage.remaining <= 0:
            self._metrics.rate_limited.labels(rule.name).inc()
            raise _refusal(usage)
        return usage

    async def allow(self, rule: Rule, key: str) -> bool:
        """Count one event if `rule` still allows it for `key` (one round trip, no headers)."""
        allowed = await self._acquire(rule, key)
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

    async def _acquire(self, rule: Rule, key: str) -> bool:
        if self._shared is not None:
            try:
                return await self._shared.hit(rule.item, rule.name, key)
            except STORAGE_FAILURES as exc:
                _warn_fallback(exc)
        return self._local.acquire(rule, key)


class LocalWindows:
    """Moving-window counters of this process, with the semantics of `limits`' moving window
    on Redis: an event counts while it is at most one window old, a refused event is not
    recorded, and an empty window resets one window from now.

    Synchronous on purpose: on one event loop nothing interleaves, so there are no locks, no
    threads and no timer; expired events go when their key is next used, and idle keys a few
    at a time on each hit, so memory follows the keys active within a window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[Rule, _Window] = {}

    def acquire(self, rule: Rule, key: str) -> bool:
        return self._window(rule).acquire(key, self._clock())

    def usage(self, rule: Rule, key: str) -> Usage:
        remaining, reset_in = self._window(rule).stats(key, self._clock())
        return Usage(rule, remaining, reset_in)

    def __len__(self) -> int:
        """Keys held, over every rule."""
        return sum(len(window.hits) for window in self._windows.values())

    def _window(self, rule: Rule) -> _Window:
        window = self._windows.get(rule)
        if window is None:
            window = self._windows[rule] = _Window(rule.item.amount, rule.item.get_expiry())
        return window


# Idle keys dropped per hit at most: more than the one key a hit can add, so a backlog shrinks,
# and few enough that no hit pays for a mass expiry at once.
_FORGET_PER_HIT = 8


class _Window:
    """One rule's counters: per key, the times of the events still in the window, oldest
    first. Keys are kept in order of their latest event, which with one window length for all
    is the order they go idle in, so idle keys are found at the front without a scan."""

    __slots__ = ("amount", "expiry", "hits")

    def __init__(self, amount: int, expiry: int) -> None:
        self.amount = amount
        self.expiry = expiry
        self.hits: OrderedDict[str, list[float]] = OrderedDict()

    def acquire(self, key: str, now: float) -> bool:
        cutoff = now - self.expiry
        self._forget_idle(cutoff)
        hits = self.hits.setdefault(key, [])
        _drop_expired(hits, cutoff)
        if len(hits) >= self.amount:
            return False
        hits.append(now)
        self.hits.move_to_end(key)
        return True

    def stats(self, key: str, now: float) -> tuple[int, int]:
        """(remaining, whole seconds until the window frees an event)."""
        hits = self.hits.get(key)
        if hits is not None:
            _drop_expired(hits, now - self.expiry)
        if not hits:
            return self.amount, self.expiry
        return self.amount - len(hits), max(0, math.ceil(hits[0] + self.expiry - now))

    def _forget_idle(self, cutoff: float) -> None:
        hits = self.hits
        for _ in range(_FORGET_PER_HIT):
            if not hits:
                return
            oldest = next(iter(hits.values()))
            if oldest and oldest[-1] >= cutoff:
                return
            hits.popitem(last=False)


def _drop_expired(hits: list[float], cutoff: float) -> None:
    if hits and hits[0] < cutoff:
        del hits[: bisect.bisect_left(hits, cutoff)]


def _refusal(usage: Usage) -> RateLimited:
    return RateLimited(usage.reset_in_s or 1, rate_limit_headers([usage]))


def _warn_fallback(exc: BaseException) -> None:
    log.warning(
        "rate-limit storage unavailable; counting in this process", extra={"error": repr(exc)}
    )


def _is_in_process(url: str) -> bool:
    return url.split(":", 1)[0] in ("memory", "async+memory")


def _shared_strategy(storage_url: str) -> MovingWindowRateLimiter:
    options = {"implementation": "redispy"} if "redis" in storage_url.split(":", 1)[0] else {}
    storage = storage_from_string(_async_scheme(storage_url), **options)
    assert isinstance(storage, Storage)
    return MovingWindowRateLimiter(storage)


def _async_scheme(url: str) -> str:
    return url if url.startswith("async+") else f"async+{url}"
