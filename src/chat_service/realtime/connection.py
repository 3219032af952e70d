"""One WebSocket connection: who it is, what it is subscribed to, and its outbound queue.

Everything sent to a client goes through a bounded queue drained by the connection's own
writer task, so a slow reader only ever delays itself. When the queue is full, droppable
frames (typing, presence) go first; if that is not enough the connection is closed 4408.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from starlette.websockets import WebSocket, WebSocketDisconnect

from chat_service.ids import new_id
from chat_service.metrics import Metrics, detached
from chat_service.schemas import UserSummary

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
# A close frame behind a reader that stopped reading never goes out: do not wait long.
STUCK_CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Outbound:
    """An encoded frame; the same object is shared by every connection it goes to."""

    text: str
    droppable: bool = False
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", len(self.text.encode()))


@dataclass(frozen=True, slots=True)
class CloseRequest:
    code: int
    reason: str
    flush: bool


class Connection:
    def __init__(
        self,
        websocket: WebSocket,
        *,
        user: UserSummary,
        session_id: str,
        expires_at: datetime,
        max_frames: int,
        max_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.id = new_id()
        self._metrics = metrics or detached()
        self.peer_close_code: int | None = None  # the client's close frame, if it sent one
        self.websocket = websocket
        self.user = user
        self.session_id = session_id
        self.expires_at = expires_at
        self.rooms: set[str] = set()
        # Rooms whose `joined` is not out yet: their live events wait here (see Hub.deliver).
        self.joining: dict[str, list[tuple[int | None, Outbound]]] = {}
        # The access token's expiry: a timer (the gateway's), not a task per connection.
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.expiry_warned_for: datetime | None = None
        self.dropped_frames = 0
        self.refused_sends: deque[float] = deque()  # when sends were rate-limited (flooding)
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._queue: deque[Outbound] = deque()
        self._queued_bytes = 0
        # Set while the writer waits for frames (a bare future: cheaper than an Event, and
        # woken once per frame in a fan-out).
        self._wakeup: asyncio.Future[None] | None = None
        self._close: CloseRequest | None = None
        self.close_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def user_id(self) -> str:
        return self.user.id

    @property
    def is_closing(self) -> bool:
        return self._close is not None

    @property
    def flushing(self) -> bool:
        """Closing, with queued frames to deliver first."""
        return self._close is not None and self._close.flush

    @property
    def close_code(self) -> int | None:
        """How it ended: our close code, else the client's, else None (no close frame)."""
        return self._close.code if self._close is not None else self.peer_close_code

    @property
    def queued(self) -> tuple[int, int]:
        return len(self._queue), self._queued_bytes

    def offer(self, frame: Outbound) -> None:
        """Queue a frame without waiting; never blocks the caller, whatever the reader does."""
        if self._close is not None:
            return
        if self._fits(frame):
            self._push(frame)
        elif frame.droppable:
            self.dropped_frames += 1
            self._metrics.ws_frames_dropped.inc()
        else:
            self._evict_droppable()
            if self._fits(frame):
                self._push(frame)
            else:
                log.info(
                    "closing a slow connection: outbound queue full",
                    extra={"connection_id": self.id, "user_id": self.user_id},
                )
                self._metrics.ws_slow_closes.inc()
                self.close(4408, "too slow: outbound queue overflowed", flush=False)

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the writer to (flush and) send a close frame. The first request wins."""
        if self._close is None:
            self._close = CloseRequest(code, reason, flush)
            if not flush:
                self._queue.clear()
                self._queued_bytes = 0
            self._wake_writer()
            self.close_requested.set_result(None)

    async def run_writer(self) -> None:
        """Drain the queue onto the socket; then close it if a close was asked for."""
        try:
            while True:
                while not self._queue and self._close is None:
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                if not self._queue:
                    break
                frame = self._queue.popleft()
                self._queued_bytes -= frame.size
                await self.websocket.send_text(frame.text)
                self._metrics.ws_frames_sent.inc()
            await self._send_close()
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:  # the peer went away
            log.debug("writer stopped", extra={"connection_id": self.id, "error": repr(exc)})

    async def abort_writer(self, writer: asyncio.Task[None]) -> None:
        """For a writer stuck behind a reader that stopped reading: cancel, then try to close."""
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        if self._close is not None:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError, WebSocketDisconnect):
                await asyncio.wait_for(self._send_close(), STUCK_CLOSE_TIMEOUT_S)

    async def _send_close(self) -> None:
        if self._close is not None:
            await self.websocket.close(self._close.code, self._close.reason)

    def _fits(self, frame: Outbound) -> bool:
        return (
            len(self._queue) < self._max_frames
            and self._queued_bytes + frame.size <= self._max_bytes
        )

    def _push(self, frame: Outbound) -> None:
        self._queue.append(frame)
        self._queued_bytes += frame.size
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _evict_droppable(self) -> None:
        kept = deque(frame for frame in self._queue if not frame.droppable)
        self.dropped_frames += len(self._queue) - len(kept)
        self._metrics.ws_frames_dropped.inc(len(self._queue) - len(kept))
        self._queue = kept
        self._queued_bytes = sum(frame.size for frame in kept)
