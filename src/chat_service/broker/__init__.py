"""Fan-out brokers behind one six-method interface, chosen by URL scheme.

`memory://` serves one process; `redis://` lets many processes and hosts share events.
"""

from __future__ import annotations

from chat_service.broker.base import Broker, Delivery
from chat_service.broker.memory import MemoryBroker
from chat_service.broker.redis import RedisBroker

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def broker_from_url(url: str) -> Broker:
    if url.startswith("memory://"):
        return MemoryBroker()
    if url.startswith(REDIS_SCHEMES):
        return RedisBroker(url)
    raise ValueError(f"unsupported BROKER_URL scheme: {url.split(':', 1)[0]!r}")


__all__ = ["REDIS_SCHEMES", "Broker", "Delivery", "MemoryBroker", "RedisBroker", "broker_from_url"]
