"""Micro-benchmark of the in-process rate limiter (RATE_LIMIT_STORAGE_URL=memory://).

`--calls` RateLimiter.allow() calls over `--keys` keys with the message rule the service uses
by default (20 sends per 2 s per user), in one of two shapes:

- `senders`: one task per key, each yielding to the event loop between its sends, the way the
  gateway's connections interleave (background work the limiter schedules gets to run);
- `loop`: one tight loop over the keys in turn;
- `paced`: `--rate` calls per second over the keys in turn, in 10 ms ticks, the event loop
  idle in between: what the limiter costs a server under a steady load (wall time is then
  set by the pace; CPU time is the figure).

Prints wall time, process CPU time (every thread of the process) and threads seen. Compare
the code before and after a change with the same command, alternating:

    PYTHONPATH=/tmp/before/src uv run python bench/limiter_micro.py
    uv run python bench/limiter_micro.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

from limits import RateLimitItemPerSecond

from chat_service.ratelimit import RateLimiter, Rule

RULE = Rule("messages", RateLimitItemPerSecond(20, 2))


async def senders(limiter: RateLimiter, calls: int, keys: int) -> int:
    per_key = calls // keys

    async def sender(key: str) -> int:
        allowed = 0
        for _ in range(per_key):
            allowed += await limiter.allow(RULE, key)
            await asyncio.sleep(0)
        return allowed

    return sum(await asyncio.gather(*(sender(f"user{n}") for n in range(keys))))


async def tight_loop(limiter: RateLimiter, calls: int, keys: int) -> int:
    names = [f"user{n}" for n in range(keys)]
    allowed = 0
    for n in range(calls):
        allowed += await limiter.allow(RULE, names[n % keys])
    return allowed


async def paced(limiter: RateLimiter, calls: int, keys: int, rate: int) -> int:
    names = [f"user{n}" for n in range(keys)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    allowed = sent = 0
    while sent < calls:
        for _ in range(min(max(1, rate // 100), calls - sent)):
            allowed += await limiter.allow(RULE, names[sent % keys])
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    return allowed


async def run(shape: str, calls: int, keys: int, rate: int) -> dict[str, float | int | str]:
    limiter = RateLimiter("memory://")
    threads_before = threading.active_count()
    wall, cpu = time.perf_counter(), time.process_time()
    if shape == "senders":
        allowed = await senders(limiter, calls, keys)
    elif shape == "loop":
        allowed = await tight_loop(limiter, calls, keys)
    else:
        allowed = await paced(limiter, calls, keys, rate)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "shape": shape,
        "calls": calls,
        "keys": keys,
        "allowed": allowed,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "threads_added": threading.active_count() - threads_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--shape", choices=("senders", "loop", "paced"), default="senders")
    parser.add_argument("--rate", type=int, default=1_000, help="calls per second (paced)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.shape, args.calls, args.keys, args.rate))))  # noqa: T201


if __name__ == "__main__":
    main()
