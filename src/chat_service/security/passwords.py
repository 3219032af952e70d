"""Password hashing with argon2id through passlib (the maintained `libpass` fork).

Hashing is CPU work that would stall every socket on the event loop, so it runs on a small
dedicated thread pool whose size bounds how many hashes run at once. Its threads run at the
lowest niceness (19), so that on a busy core the event loop goes first and the logins absorb
the wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from passlib.context import CryptContext

T = TypeVar("T")

log = logging.getLogger(__name__)

LOWEST_NICENESS = 19


def lower_thread_priority() -> None:
    """Give the calling thread niceness 19 (Linux sets it per thread, by thread id).

    Not SCHED_IDLE, which is lower still: a SCHED_IDLE thread gets next to no CPU while any
    other task wants the core, so logins stop, and one holding the GIL then stalls the event
    loop as well (measured beside one busy process on the same core: SCHED_IDLE, no hash
    done in 7 s and loop stalls up to 113 ms; niceness 19, about 2 hashes/s)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run as is
        log.debug("hashing threads keep their priority", extra={"error": repr(exc)})


@dataclass(frozen=True)
class Verification:
    ok: bool
    # A new hash when the stored one used older parameters and should be replaced.
    new_hash: str | None = None


class PasswordHasher:
    def __init__(
        self, *, memory_kib: int, time_cost: int, parallelism: int, concurrency: int
    ) -> None:
        self._context = CryptContext(
            schemes=["argon2"],
            argon2__type="ID",
            argon2__memory_cost=memory_kib,
            argon2__rounds=time_cost,
            argon2__parallelism=parallelism,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=concurrency,
            thread_name_prefix="argon2",
            initializer=lower_thread_priority,
        )
        self._dummy_hash = self._context.hash("dummy password for unknown users")

    async def hash(self, password: str) -> str:
        return str(await self._run(self._context.hash, password))

    async def verify(self, password: str, stored_hash: str | None) -> Verification:
        """Check a password; with no stored hash (unknown user) spend the same time and fail."""
        if stored_hash is None:
            await self._run(self._context.verify, password, self._dummy_hash)
            return Verification(ok=False)
        ok, new_hash = await self._run(self._context.verify_and_update, password, stored_hash)
        return Verification(ok=bool(ok), new_hash=new_hash)

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
