"""Password hashing threads run at the lowest niceness, so the event loop goes first."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from chat_service.security.passwords import LOWEST_NICENESS, PasswordHasher

# No database: see tests/conftest.py. Linux only, like the service's image: niceness is
# set per thread there (elsewhere the test fails loudly rather than skip).
pytestmark = pytest.mark.backend_independent(suite="postgres")


def stat_niceness(tid: int) -> int:
    """The niceness the kernel reports for one thread of this process (field 19 of its stat)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    # The fields after the command name (in parentheses, may hold spaces) start at field 3.
    return int(stat.rsplit(")", 1)[1].split()[19 - 3])


async def test_hashing_threads_run_at_the_lowest_niceness() -> None:
    assert sys.platform == "linux", "per-thread niceness is a Linux feature"
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert caller < LOWEST_NICENESS, "run the tests at a normal priority: threads inherit it"
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
            assert stat_niceness(thread.native_id) == LOWEST_NICENESS, thread.name
        # Only those threads: the caller's (the event loop's) keeps its niceness.
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller
        assert stat_niceness(threading.get_native_id()) == caller
    finally:
        hasher.close()
