"""Group commit: requests that arrive while a transaction is in flight wait and go into the
next one together.

Nothing waits on a timer: a lone request is stored at once, and under load each transaction
takes everything that queued up behind the previous one (up to `max_batch`). Each caller gets
its own outcome (a result or an exception) once the transaction holding its request has
committed or failed. Reads batch the same way: the access-token checks share one statement
(domain/accounts.py).

A store that is quick in wall time (a read on a connection kept for it) finds few requests
queued behind it, so its batches stay small and its fixed cost is paid nearly once per
request. `gather_turns` lets that many event-loop turns pass before each batch is taken: on
an idle loop a turn costs microseconds, and on a busy one each turn runs the work already
ready, which brings the requests already read from the network into the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class GroupCommit(Generic[Request, Result]):
    def __init__(
        self,
        store: Callable[[list[Request]], Awaitable[Sequence[Result | BaseException]]],
        max_batch: int,
        gather_turns: int = 0,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._gather_turns = gather_turns
        self._pending: list[tuple[Request, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def enqueue(self, request: Request) -> asyncio.Future[Result]:
        """Queue a request without waiting; the future settles once its batch is done.
        Requests are stored in the order they were queued."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        # Read every outcome here, so one whose caller has gone is not reported as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._pending.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return future

    async def _flush(self) -> None:
        while self._pending:
            for _ in range(self._gather_turns):
                await asyncio.sleep(0)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                outcomes = await self._store([request for request, _ in batch])
            except BaseException as exc:  # the whole transaction failed: nobody is stored
                for _, future in batch:
                    _settle(future, exc)
                if isinstance(exc, asyncio.CancelledError):
                    self._fail_pending(exc)
                    raise
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _settle(future, outcome)

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, []
        for _, future in pending:
            _settle(future, exc)


def _settle(future: asyncio.Future[Result], outcome: object) -> None:
    if future.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)  # type: ignore[arg-type]
