"""The broker interface: what the fan-out needs from a publish/subscribe backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: str
    payload: bytes


class Broker(Protocol):
    """Every published payload reaches every process subscribed to its channel, this one
    included, at most once. Delivery to this process never depends on the network."""

    healthy: bool  # False while a networked backend is unreachable (see /readyz)

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def subscribe(self, channel: str) -> None:
        """Return once deliveries on `channel` are guaranteed to arrive."""

    async def unsubscribe(self, channel: str) -> None: ...

    async def publish(self, channel: str, payload: bytes) -> None: ...

    def deliveries(self) -> AsyncIterator[Delivery]:
        """Everything published on subscribed channels, in arrival order."""
        ...
