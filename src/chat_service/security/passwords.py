"""Password hashing with argon2id through passlib (the maintained `libpass` fork).

Hashing is CPU work that would stall every socket on the event loop, so it runs on a small
dedicated thread pool whose size bounds how many hashes run at once. Its threads have the
lowest CPU priority there is (SCHED_IDLE): whenever the event loop wakes up it takes the core
at once, and the logins absorb the wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from passlib.context import CryptContext

T = TypeVar("T")

log = logging.getLogger(__name__)


def lower_thread_priority() -> None:
    """Give the calling thread the SCHED_IDLE policy (Linux: per thread; 0 is the caller).

    Not merely nice 19: the scheduler may let a thread at nice 19 run out its slice before
    a waking thread at nice 0 gets the core, whereas it preempts a SCHED_IDLE thread at once
    (measured with the login-storm bench: chat p99 13 ms with SCHED_IDLE, 15 ms at nice 19)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
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
