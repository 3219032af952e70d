"""The in-process broker: one process, no network, same interface as the shared ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from chat_service.broker.base import Delivery


class MemoryBroker:
    def __init__(self) -> None:
        self.healthy = True
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        self._channels.clear()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        if channel in self._channels:
            self._queue.put_nowait(Delivery(channel, payload))

    async def deliveries(self) -> AsyncIterator[Delivery]:
        while True:
            yield await self._queue.get()
