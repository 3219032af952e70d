"""uvicorn's settings for this service, in one place for `serve` and the tests."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import State

from chat_service.realtime.connection import FRAME_WRITER
from chat_service.settings import Settings

log = logging.getLogger(__name__)

# How long a socket may sit with unsent data once the app is done with it.
ABORT_STUCK_AFTER_S = 5.0


class Inbox:
    """What uvicorn's protocol uses of an asyncio.Queue (put_nowait, get, empty) for the events
    it hands the app, without the Queue's four deques and Event: ~3 KiB of every idle socket.
    It holds a message or two at a time (uvicorn stops reading while one waits)."""

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_one()

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter in self._getters:
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_one()  # woken, then cancelled: the item is another getter's
                raise
        return self._items.pop(0)

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return


class Flag:
    """asyncio.Event's wait/set/clear/is_set, its waiters' list made only when one waits
    (an Event makes a deque up front: ~0.8 KiB of every idle socket)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, minus one leak, plus one shortcut, on a diet.

    The leak: a peer that stopped reading. When the app is done, uvicorn closes the transport,
    and asyncio waits for the send buffer to drain before it lets the socket go, which for
    such a peer is never: its kernel buffers (megabytes) stay held. Aborting the transport
    after a grace period releases them.

    The shortcut: it is a `FrameWriter` (realtime/connection.py), offered to the app in the
    scope's extensions, so a connection writes every frame it has queued in one socket write
    instead of one ASGI `send`, one framing and one send() per frame. Control frames (close,
    ping, pong) still go through the sans-I/O protocol, which keeps their state.

    The diet, for 10,000s of idle sockets: a lighter queue and event (Inbox, Flag), and the
    handshake's request and response (every header, parsed twice) let go once answered.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.queue = cast(Any, Inbox())
        writable = Flag()
        writable.set()
        self.writable = cast(Any, writable)

    def start_keepalive(self) -> None:
        # Called once the handshake's 101 response is written: nothing reads them again. The
        # request's headers are emptied too, as the sans-I/O parser's generator keeps the
        # request itself (a local of its frame) for the connection's life.
        self.request.headers.clear()
        del self.request, self.response
        super().start_keepalive()

    async def run_asgi(self) -> None:
        extensions = cast(dict[str, Any], self.scope).setdefault("extensions", {})
        extensions[FRAME_WRITER] = self
        await super().run_asgi()
        self.loop.call_later(ABORT_STUCK_AFTER_S, self._abort_if_stuck)

    def send_receive_event_to_app(self) -> None:
        # RFC 6455 §8.1: a text frame that is not UTF-8 fails the connection with 1007, as
        # uvicorn does; but uvicorn logs it at ERROR with a traceback, one per such frame,
        # which lets any client fill the logs. Most frames are ASCII: no trial decode.
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if not data.isascii() and not _is_utf8(data):
                self.frames = []
                log.info("websocket failed: a text frame is not UTF-8", extra={"close_code": 1007})
                self.conn.send_close(1007, "text frames must be UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def frames_open(self) -> bool:
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.conn.state is State.OPEN
        )

    def writable_now(self) -> bool:
        return bool(self.writable.is_set())

    async def wait_writable(self) -> None:
        await self.writable.wait()

    def write_frames(self, data: bytes) -> None:
        self.transport.write(data)

    def _abort_if_stuck(self) -> None:
        if not self.disconnected:
            self.transport.abort()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "ws": WebSocketProtocol,
        # Compression costs ~30 KiB per socket and invites CRIME-style leaks.
        "ws_per_message_deflate": False,
        "ws_max_size": settings.frame_max_bytes,
        "ws_ping_interval": settings.heartbeat_interval_s,
        "ws_ping_timeout": settings.heartbeat_timeout_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "server_header": False,
        "log_config": None,
    }
