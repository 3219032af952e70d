"""Password hashing threads run at the lowest CPU priority, so the event loop goes first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from chat_service.security.passwords import PasswordHasher

pytestmark = [
    pytest.mark.backend_independent(suite="postgres"),  # no database: see tests/conftest.py
    pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only"),
]

SCHED_IDLE_POLICY = 5  # the `policy` field of /proc/<pid>/task/<tid>/stat for SCHED_IDLE


def stat_policy(tid: int) -> int:
    """The scheduling policy the kernel reports for one thread (field 41 of its stat)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces; field 3
    # (the state) comes first, so field 41 is at index 38.
    return int(stat.rsplit(")", 1)[1].split()[38])


async def test_hashing_threads_run_at_the_lowest_priority() -> None:
    hasher = PasswordHasher(memory_kib=1024, time_cost=1, parallelism=1, concurrency=2)
    try:
        hashed = await hasher.hash("correct horse")
        assert (await hasher.verify("correct horse", hashed)).ok
        assert not (await hasher.verify("wrong horse", hashed)).ok
        assert not (await hasher.verify("correct horse", None)).ok  # unknown user
        hashing = [t for t in threading.enumerate() if t.name.startswith("argon2")]
        assert hashing, "no hashing thread ran"
        for thread in hashing:
            assert thread.native_id is not None
            assert os.sched_getscheduler(thread.native_id) == os.SCHED_IDLE, thread.name
            assert stat_policy(thread.native_id) == SCHED_IDLE_POLICY, thread.name
        # The caller's thread (the event loop's) keeps the normal policy.
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
    finally:
        hasher.close()
