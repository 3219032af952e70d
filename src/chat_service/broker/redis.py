"""The Redis pub/sub broker: events cross processes and hosts through Redis.

Payloads published here reach this process's own subscribers directly (not through Redis),
so local delivery goes on while Redis is down; other processes get them through Redis, and
echoes of our own publishes are dropped by their origin tag. The subscriber connection
reconnects with backoff and subscribes again to every channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chat_service.broker.base import Delivery

log = logging.getLogger(__name__)

OPERATION_TIMEOUT_S = 2.0
# Publishes waiting for Redis; past this (Redis slow or down) the oldest are dropped.
OUTBOX_LIMIT = 10_000
# Publishes sent in one pipeline at most.
PUBLISH_BATCH = 256
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# The subscriber pings Redis this often and gives up on a connection that has said nothing
# for PING_EVERY_S + SILENCE_LIMIT_S: a frozen Redis (SIGSTOP, a dead host, a black-holed
# route) keeps the TCP connection open and would otherwise never be noticed.
PING_EVERY_S = 2.0
SILENCE_LIMIT_S = 3.0
SEPARATOR = b"|"
FAILURES = (RedisError, OSError, TimeoutError)


class RedisBroker:
    def __init__(self, url: str) -> None:
        self.healthy = False
        self._url = url
        self._origin = secrets.token_hex(8).encode()
        self._channels: set[str] = set()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(OUTBOX_LIMIT)
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        self._client = aioredis.from_url(
            self._url,
            socket_connect_timeout=OPERATION_TIMEOUT_S,
            # Longer than the subscriber's read tick, so only a stuck call times out.
            socket_timeout=OPERATION_TIMEOUT_S * 2,
            health_check_interval=5,
        )
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="redis-broker-reader"),
            asyncio.create_task(self._send_forever(), name="redis-broker-sender"),
        ]

    async def disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_pubsub()
        if self._client is not None:
            await self._client.aclose()
        self.healthy = False

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        if self._pubsub is None or not self.healthy:
            return  # the reader subscribes to every channel when it (re)connects
        confirmed = self._confirmations.setdefault(
            channel, asyncio.get_running_loop().create_future()
        )
        try:
            await asyncio.wait_for(self._pubsub.subscribe(channel), OPERATION_TIMEOUT_S)
            await asyncio.wait_for(asyncio.shield(confirmed), OPERATION_TIMEOUT_S)
        except FAILURES as exc:
            log.warning("redis subscribe failed", extra={"channel": channel, "error": repr(exc)})
        finally:
            self._confirmations.pop(channel, None)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._pubsub is not None and self.healthy:
            with contextlib.suppress(*FAILURES):
                await asyncio.wait_for(self._pubsub.unsubscribe(channel), OPERATION_TIMEOUT_S)

    async def publish(self, channel: str, payload: bytes) -> None:
        """Deliver here at once; hand the rest to the sender, so a slow Redis delays no one."""
        if channel in self._channels:
            self._queue.put_nowait(Delivery(channel, payload))
        if self._outbox.full():
            self._outbox.get_nowait()
            log.warning("redis outbox full: dropping the oldest publish")
        self._outbox.put_nowait((channel, self._origin + SEPARATOR + payload))

    async def _send_forever(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < PUBLISH_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            await self._send(batch)

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        """What queued up meanwhile, in order, in one pipeline: one round trip for all."""
        assert self._client is not None
        for attempt in (1, 2):  # a pooled connection may have died with an old Redis
            try:
                async with self._client.pipeline(transaction=False) as pipeline:
                    for channel, message in batch:
                        pipeline.publish(channel, message)
                    # No wait_for: the client's socket timeout bounds a stuck call, and a
                    # wait_for around a pipeline could leave this task deaf to its cancel.
                    await pipeline.execute()
                return
            except FAILURES as exc:
                if attempt == 2 or not isinstance(exc, RedisConnectionError):
                    # Local subscribers had them; other processes miss them (clients resync).
                    log.warning(
                        "redis publish failed",
                        extra={"events": len(batch), "error": repr(exc)},
                    )
                    return

    async def deliveries(self) -> AsyncIterator[Delivery]:
        while True:
            yield await self._queue.get()

    async def _read_forever(self) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                await self._listen()
            except FAILURES as exc:
                if self.healthy:  # it was working: start over from the shortest wait
                    log.warning("redis connection lost; reconnecting", extra={"error": repr(exc)})
                    backoff = BACKOFF_FIRST_S
                self.healthy = False
                await self._close_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _listen(self) -> None:
        """Subscribe and read until the connection fails (it never ends otherwise)."""
        assert self._client is not None
        self._pubsub = self._client.pubsub()
        if not self._channels:
            raise RedisError("nothing to subscribe to yet")
        await asyncio.wait_for(self._pubsub.subscribe(*self._channels), OPERATION_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        last_heard = next_ping = loop.time()
        while True:
            message = await self._pubsub.get_message(timeout=PING_EVERY_S / 2)
            now = loop.time()
            if message is not None:
                last_heard = now
                if not self.healthy:  # Redis answered: deliveries flow again
                    log.info("redis broker connected", extra={"channels": len(self._channels)})
                    self.healthy = True
                self._handle(message)
            elif now - last_heard > PING_EVERY_S + SILENCE_LIMIT_S:
                raise TimeoutError("redis stopped answering the subscriber's pings")
            if now >= next_ping:
                await asyncio.wait_for(self._pubsub.ping(), OPERATION_TIMEOUT_S)
                next_ping = now + PING_EVERY_S

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "subscribe":
            future = self._confirmations.get(message["channel"].decode())
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "message":
            channel = message["channel"].decode()
            origin, _, payload = message["data"].partition(SEPARATOR)
            if origin != self._origin and channel in self._channels:
                self._queue.put_nowait(Delivery(channel, payload))

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*FAILURES):
                await asyncio.wait_for(self._pubsub.aclose(), OPERATION_TIMEOUT_S)
            self._pubsub = None
