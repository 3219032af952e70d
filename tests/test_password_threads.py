"""Password hashing threads run at the lowest priority, so the event loop goes first."""

from __future__ import annotations

import os
import threading

from chat_service.security.passwords import LOWEST_PRIORITY, PasswordHasher


async def test_hashing_threads_run_at_the_lowest_priority() -> None:
    hasher = PasswordHasher(memory_kib=1024, time_cost=1, parallelism=1, concurrency=2)
    try:
        hashed = await hasher.hash("correct horse")
        assert (await hasher.verify("correct horse", hashed)).ok
        assert not (await hasher.verify("wrong horse", hashed)).ok
        hashing_threads = [t for t in threading.enumerate() if t.name.startswith("argon2")]
        assert hashing_threads, "no hashing thread ran"
        for thread in hashing_threads:
            assert thread.native_id is not None
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == LOWEST_PRIORITY
        # The caller's own thread (the event loop's) keeps its priority.
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < LOWEST_PRIORITY
    finally:
        hasher.close()
