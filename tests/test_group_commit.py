"""GroupCommit on its own: a lone request goes at once, requests that queue behind a batch in
flight go together in the next (up to the batch limit), those arriving within `gather_turns`
loop turns join the batch about to go, and a failed batch fails only its own requests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from chat_service.domain.group_commit import GroupCommit

pytestmark = pytest.mark.backend_independent  # no database: see tests/conftest.py


class Store:
    """Records each batch; holds it until released, and fails those naming 'boom'."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, requests: list[str]) -> Sequence[str | BaseException]:
        self.batches.append(list(requests))
        await self.release.wait()
        if "boom" in requests:
            raise RuntimeError("the transaction failed")
        return [request.upper() for request in requests]


async def _enqueue_after(commit: GroupCommit[str, str], request: str, turns: int) -> str:
    for _ in range(turns):
        await asyncio.sleep(0)
    return await commit.enqueue(request)


async def test_a_lone_request_is_stored_at_once_and_later_ones_queue_for_the_next_batch() -> None:
    store = Store(hold=True)
    commit = GroupCommit(store, max_batch=2)
    first = commit.enqueue("a")
    await asyncio.sleep(0)
    assert store.batches == [["a"]]
    rest = [commit.enqueue(name) for name in ("b", "c", "d")]  # while "a" is in flight
    store.release.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == ["B", "C", "D"]
    assert store.batches == [["a"], ["b", "c"], ["d"]]


@pytest.mark.parametrize(
    ("gather_turns", "expected"),
    [(0, [["a"], ["b"], ["c"]]), (4, [["a", "b", "c"]])],  # a quick store: batches of one
)
async def test_requests_arriving_within_the_gather_turns_join_the_batch_about_to_go(
    gather_turns: int, expected: list[list[str]]
) -> None:
    store = Store()
    commit = GroupCommit(store, max_batch=64, gather_turns=gather_turns)
    answers = await asyncio.gather(
        commit.enqueue("a"), _enqueue_after(commit, "b", 1), _enqueue_after(commit, "c", 2)
    )
    assert answers == ["A", "B", "C"]
    assert store.batches == expected


async def test_a_failed_batch_fails_its_own_requests_and_the_next_batch_still_goes() -> None:
    store = Store(hold=True)
    commit = GroupCommit(store, max_batch=64)
    doomed = [commit.enqueue("boom"), commit.enqueue("x")]
    await asyncio.sleep(0)
    later = commit.enqueue("y")
    store.release.set()
    for future in doomed:
        with pytest.raises(RuntimeError, match="transaction failed"):
            await future
    assert await later == "Y"
    assert store.batches == [["boom", "x"], ["y"]]
