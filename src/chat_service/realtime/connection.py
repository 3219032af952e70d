"""One WebSocket connection: who it is, what it is subscribed to, and its outbound queue.

Everything sent to a client goes through a bounded queue drained by the connection's own
writer task, so a slow reader only ever delays itself. When the queue is full, droppable
frames (typing, presence) go first; if that is not enough the connection is closed 4408.

Each frame is built once, header included (server frames are unmasked, so the bytes are the
same for every client), and everything queued goes on the socket in one write when the
server offers a `FrameWriter` (ours does, see server.py): by the hub's `Flusher` once per
pass of the event loop while the socket keeps up, by the writer task when it is backed up or
closing. Elsewhere (another ASGI server, Starlette's TestClient) frames go one by one through
ASGI `send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from chat_service.ids import new_id
from chat_service.metrics import Metrics, detached
from chat_service.schemas import UserSummary

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
# A close frame behind a reader that stopped reading never goes out: do not wait long.
STUCK_CLOSE_TIMEOUT_S = 1.0


# The key in the ASGI scope's "extensions" under which the server offers a FrameWriter.
FRAME_WRITER = "chat_service.frame_writer"
_TEXT_FRAME = 0x81  # FIN + opcode 1 (text)


class FrameWriter(Protocol):
    """Writes ready-made frames straight to the socket, bypassing per-frame ASGI `send`."""

    def frames_open(self) -> bool:
        """True while data frames may still go out (no close sent or received)."""
        ...

    def writable_now(self) -> bool:
        """True unless the transport is above its high-water mark."""
        ...

    async def wait_writable(self) -> None:
        """Return once the transport is below its high-water mark, like ASGI `send` does."""
        ...

    def write_frames(self, data: bytes) -> None: ...


class Flusher:
    """Writes, once per pass of the event loop, what was offered to connections meanwhile:
    one callback for a whole fan-out instead of waking every member's writer task. A
    connection whose socket is backed up, or that is closing, is left to its writer."""

    def __init__(self) -> None:
        self._dirty: dict[Connection, None] = {}  # insertion-ordered set
        self._scheduled = False

    def mark(self, connection: Connection) -> None:
        self._dirty[connection] = None
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, {}
        for connection in dirty:
            connection.flush()


@dataclass(frozen=True, slots=True)
class Outbound:
    """An encoded text frame; the same object is shared by every connection it goes to."""

    payload: InitVar[bytes | str]
    droppable: bool = False
    wire: bytes = field(init=False)  # header + payload, as it goes on the socket
    size: int = field(init=False)  # payload bytes: what the queue's byte budget counts

    def __post_init__(self, payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        object.__setattr__(self, "wire", _frame_header(len(data)) + data)
        object.__setattr__(self, "size", len(data))

    @property
    def text(self) -> str:
        return self.wire[len(self.wire) - self.size :].decode()


def _frame_header(length: int) -> bytes:
    if length < 126:
        return bytes((_TEXT_FRAME, length))
    if length < 1 << 16:
        return struct.pack("!BBH", _TEXT_FRAME, 126, length)
    return struct.pack("!BBQ", _TEXT_FRAME, 127, length)


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
        self._frame_writer: FrameWriter | None = websocket.scope.get("extensions", {}).get(
            FRAME_WRITER
        )
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
        # message.send frames waiting for their commit (the gateway pipelines them).
        self.sends_in_flight: list[asyncio.Future[Any]] = []
        self.send_bytes_in_flight = 0  # their bodies' bytes
        self._refused_sends: deque[float] | None = None
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        # A list, not a deque: an idle socket's empty deque costs ~0.7 KiB, and the queue is
        # handed to the socket whole (FrameWriter), or popped from the front only without one.
        self._queue: list[Outbound] = []
        self._queued_bytes = 0
        # Set while the writer waits for frames (a bare future: cheaper than an Event, and
        # woken once per frame in a fan-out).
        self._wakeup: asyncio.Future[None] | None = None
        self._close: CloseRequest | None = None
        self.flusher: Flusher | None = None  # the hub's, set when registered
        self.close_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def refused_sends(self) -> deque[float]:
        """When sends were rate-limited (flooding); made on the first refusal, as most
        connections never have one."""
        if self._refused_sends is None:
            self._refused_sends = deque()
        return self._refused_sends

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
                if self._frame_writer is not None:
                    await self._write_queued(self._frame_writer)
                else:
                    await self._send_next()
            await self._send_close()
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:  # the peer went away
            log.debug("writer stopped", extra={"connection_id": self.id, "error": repr(exc)})

    async def _write_queued(self, writer: FrameWriter) -> None:
        """Everything queued, in one socket write: a fan-out burst costs one send() each."""
        await writer.wait_writable()
        if not writer.frames_open():
            raise ConnectionResetError("the socket is closing")
        self._write_batch(writer)

    def _write_batch(self, writer: FrameWriter) -> None:
        batch, self._queue, self._queued_bytes = self._queue, [], 0
        if batch:
            data = batch[0].wire if len(batch) == 1 else b"".join([f.wire for f in batch])
            writer.write_frames(data)
            self._metrics.ws_frames_sent.inc(len(batch))
            self._metrics.ws_socket_writes.inc()

    async def _send_next(self) -> None:
        frame = self._queue.pop(0)
        self._queued_bytes -= frame.size
        await self.websocket.send_text(frame.text)
        self._metrics.ws_frames_sent.inc()
        self._metrics.ws_socket_writes.inc()

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
        if self.flusher is not None and self._frame_writer is not None:
            self.flusher.mark(self)
        else:
            self._wake_writer()

    def flush(self) -> None:
        """Write everything queued now, in one write, if the writer task is idle and the
        socket takes it; otherwise wake the writer, which waits for the socket."""
        writer = self._frame_writer
        idle = self._wakeup is not None and not self._wakeup.done()
        if idle and writer is not None and writer.writable_now() and writer.frames_open():
            self._write_batch(writer)
        else:
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _evict_droppable(self) -> None:
        kept = [frame for frame in self._queue if not frame.droppable]
        self.dropped_frames += len(self._queue) - len(kept)
        self._metrics.ws_frames_dropped.inc(len(self._queue) - len(kept))
        self._queue = kept
        self._queued_bytes = sum(frame.size for frame in kept)
