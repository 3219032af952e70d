"""Fan-out: domain events go out through the broker, and what the broker delivers goes to
the hub. One path in every mode, so one process and many behave alike.

Events are published in the order they happened, by one task, and a room's broker channel
is subscribed while the room has local subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from chat_service.broker import Broker
from chat_service.domain.events import Event
from chat_service.realtime.hub import Hub

log = logging.getLogger(__name__)

SESSIONS_CHANNEL = "chat:sessions"


def channel_of(event: Event) -> str:
    if event.room_id is not None:
        return f"chat:room:{event.room_id}"
    return SESSIONS_CHANNEL


def encode_event(event: Event) -> bytes:
    return orjson.dumps(
        {
            "type": event.type,
            "data": event.data,
            "room_id": event.room_id,
            "user_id": event.user_id,
            "session_id": event.session_id,
        },
        option=orjson.OPT_UTC_Z,  # datetimes as pydantic writes them, as frames have them
    )


def decode_event(payload: bytes) -> Event:
    fields: dict[str, Any] = orjson.loads(payload)
    return Event(**fields)


class Fanout:
    def __init__(self, broker: Broker, hub: Hub) -> None:
        self.broker = broker
        self._hub = hub
        self._outbox: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribed: set[str] = set()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.broker.subscribe(SESSIONS_CHANNEL)
        await self.broker.connect()
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="fanout-publisher"),
            asyncio.create_task(self._deliver_forever(), name="fanout-deliverer"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.broker.disconnect()

    def publish(self, event: Event) -> None:
        """EventBus subscriber: never blocks; the publisher task sends in order."""
        self._outbox.put_nowait(event)

    async def watch(self, room_id: str) -> None:
        """Make sure the broker delivers the room's events here (call after Hub.subscribe)."""
        await self._sync(room_id)

    def room_idle(self, room_id: str) -> None:
        """Hub callback: the room's last local subscriber left."""
        task = asyncio.get_running_loop().create_task(self._sync(room_id))
        task.add_done_callback(_log_failure)

    async def _sync(self, room_id: str) -> None:
        # One at a time, so a quick leave-and-join cannot end unsubscribed.
        async with self._lock:
            wanted = self._hub.has_subscribers(room_id)
            channel = f"chat:room:{room_id}"
            if wanted and channel not in self._subscribed:
                await self.broker.subscribe(channel)
                self._subscribed.add(channel)
            elif not wanted and channel in self._subscribed:
                self._subscribed.discard(channel)
                await self.broker.unsubscribe(channel)

    async def _publish_forever(self) -> None:
        while True:
            event = await self._outbox.get()
            try:
                await self.broker.publish(channel_of(event), encode_event(event))
            except Exception:  # one bad event must not stop the fan-out
                log.exception("publishing an event failed", extra={"event": event.type})

    async def _deliver_forever(self) -> None:
        async for delivery in self.broker.deliveries():
            try:
                self._hub.dispatch(decode_event(delivery.payload))
            except Exception:  # one bad payload must not stop the fan-out
                log.exception("delivering an event failed", extra={"channel": delivery.channel})


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("broker subscription change failed", exc_info=task.exception())
