"""The Redis broker against the real Redis: a burst of publishes goes out in pipelines (one
round trip each) and reaches another process's subscriber whole and in order."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

from chat_service.broker.redis import PUBLISH_BATCH, RedisBroker

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def test_a_burst_of_publishes_goes_in_pipelines_and_arrives_in_order() -> None:
    channel = f"chat:test:{secrets.token_hex(4)}"
    sender, receiver = RedisBroker(REDIS_URL), RedisBroker(REDIS_URL)
    # Subscribed before connecting, as the app does (its sessions channel): the readers
    # subscribe once connected.
    await receiver.subscribe(channel)
    await sender.subscribe(f"{channel}:sender")
    await receiver.connect()
    await sender.connect()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not (receiver.healthy and sender.healthy):
            assert asyncio.get_running_loop().time() < deadline, "a subscriber never connected"
            await asyncio.sleep(0.01)
        pipelines = _count_pipelines(sender)
        burst = [f"event {n}".encode() for n in range(PUBLISH_BATCH + 44)]
        for payload in burst:  # nothing here yields: the sender finds the whole burst queued
            await sender.publish(channel, payload)
        received = []
        async with asyncio.timeout(10):
            async for delivery in receiver.deliveries():
                received.append(delivery.payload)
                if len(received) == len(burst):
                    break
        assert received == burst
        assert pipelines == [PUBLISH_BATCH, 44]
    finally:
        await sender.disconnect()
        await receiver.disconnect()


def _count_pipelines(broker: RedisBroker) -> list[int]:
    """The number of publishes in each pipeline the broker executes, as it executes them."""
    client: Any = broker._client
    sizes: list[int] = []
    make_pipeline = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        made = make_pipeline(*args, **kwargs)
        execute = made.execute

        async def counted_execute(*a: Any, **kw: Any) -> Any:
            sizes.append(len(made.command_stack))
            return await execute(*a, **kw)

        made.execute = counted_execute
        return made

    client.pipeline = pipeline
    return sizes
