"""The WebSocket gateway: handshake authentication, the frame handlers, and connection life.

A connection is three tasks: the ASGI handler, which waits for the other two, the receive
loop and the connection's writer (the token's expiry is a timer). The handler returns when
the client goes, the writer has closed the socket, or a close it asked for could not be
delivered in time (a reader that stopped reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.websockets import WebSocket

from chat_service.api.input_guard import json_text_has_nul
from chat_service.clock import utcnow
from chat_service.domain.accounts import AccountService, Principal
from chat_service.domain.events import Event, EventSink
from chat_service.domain.history import HistoryService
from chat_service.domain.messages import MessageService, Sent
from chat_service.domain.rooms import RoomService
from chat_service.errors import (
    DomainError,
    Forbidden,
    RateLimited,
    Unauthorized,
    is_storage_failure,
    socket_error,
)
from chat_service.logging_config import bind_connection
from chat_service.metrics import Metrics, detached
from chat_service.ratelimit import RateLimiter, Rule
from chat_service.realtime import frames
from chat_service.realtime.connection import CLOSE_TIMEOUT_S, Connection, Outbound
from chat_service.realtime.fanout import Fanout
from chat_service.realtime.hub import Hub
from chat_service.realtime.presence import LocalPresence
from chat_service.settings import Settings

log = logging.getLogger(__name__)

EXPIRING_NOTICE_S = 60.0
SINCE_SEQ_CAP = 1000
DEFAULT_HISTORY = 50
# More refused sends than this within FLOOD_WINDOW_S closes the connection 4429.
FLOOD_REFUSALS = 50
FLOOD_WINDOW_S = 10.0
FLOOD_BACKOFF_S = 30
# Sends of one connection waiting for their commit; past this, its next frame waits.
MAX_SENDS_IN_FLIGHT = 32

Handler = Callable[[Connection, Any], Awaitable[None]]


class Refused(Exception):
    """The handshake is refused: accepted only to be closed with `code` at once."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Gateway:
    def __init__(
        self,
        *,
        settings: Settings,
        hub: Hub,
        fanout: Fanout,
        presence: LocalPresence,
        limiter: RateLimiter,
        events: EventSink,
        accounts: AccountService,
        rooms: RoomService,
        messages: MessageService,
        history: HistoryService,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics or detached()
        self._hub = hub
        self._fanout = fanout
        self._presence = presence
        self._limiter = limiter
        # Shared by every worker through the limiter's storage, like the message limit.
        self._typing_rule = Rule.parse("typing", f"{settings.typing_rate_per_s}/second")
        self._events = events
        self._accounts = accounts
        self._rooms = rooms
        self._messages = messages
        self._history = history
        self._draining = False
        self._handlers: dict[str, Handler] = {
            "join": self._join,
            "leave": self._leave,
            "message.send": self._send,
            "typing": self._typing,
            "read": self._read,
            "ping": self._ping,
            "auth.refresh": self._auth_refresh,
        }

    # --- connection life ---------------------------------------------------------------------

    async def serve(self, websocket: WebSocket, room_id: str | None = None) -> None:
        subprotocol = (
            frames.PROTOCOL if frames.PROTOCOL in websocket.scope.get("subprotocols", []) else None
        )
        try:
            principal = await self._authenticate(websocket)
            await self._claim_connection(principal)
        except Refused as refused:
            self._metrics.handshake_refused(refused.code, refused.__cause__)
            await websocket.accept(subprotocol=subprotocol)
            await websocket.close(refused.code, refused.reason)
            log.info(
                "websocket refused", extra={"close_code": refused.code, "reason": refused.reason}
            )
            return
        try:
            await self._serve(websocket, subprotocol, principal, room_id)
        finally:
            self._presence.release_connection(principal.user.id)

    async def _serve(
        self,
        websocket: WebSocket,
        subprotocol: str | None,
        principal: Principal,
        room_id: str | None,
    ) -> None:
        connection = Connection(
            websocket,
            user=principal.user.summary(),
            session_id=principal.session_id,
            expires_at=principal.expires_at,
            max_frames=self._settings.outbound_queue_frames,
            max_bytes=self._settings.outbound_queue_bytes,
            metrics=self._metrics,
        )
        bind_connection(connection.id)  # every line about this connection carries its id
        # Registered before any await: the per-user connection cap just claimed holds.
        self._hub.register(connection)
        self._metrics.ws_opened.inc()
        try:
            await websocket.accept(subprotocol=subprotocol)
            log.info(
                "websocket open",
                extra={"connection_id": connection.id, "user_id": connection.user_id},
            )
            connection.offer(Outbound(self._hello(connection).encode()))
            await self._run(connection, room_id)
        finally:
            self._hub.unregister(connection)
            self._metrics.ws_closed_with(connection.close_code)
            log.info(
                "websocket closed",
                extra={"connection_id": connection.id, "user_id": connection.user_id},
            )

    async def _run(self, connection: Connection, room_id: str | None) -> None:
        writer = asyncio.create_task(connection.run_writer(), name=f"ws-writer-{connection.id}")
        receiver = asyncio.create_task(
            self._receive(connection, room_id), name=f"ws-receiver-{connection.id}"
        )
        self._arm_expiry(connection)
        try:
            done, _ = await asyncio.wait(
                {writer, receiver, connection.close_requested}, return_when=asyncio.FIRST_COMPLETED
            )
            if writer not in done and connection.is_closing:
                # Closing: out of the room at once, whatever the socket does from here on.
                self._hub.unregister(connection)
                # Give the writer a moment to flush and send the close. One still stuck
                # after that (or one with nothing to flush) is behind a reader that
                # stopped reading.
                timeout = CLOSE_TIMEOUT_S if connection.flushing else 0
                finished, _ = await asyncio.wait({writer}, timeout=timeout)
                if not finished:
                    await connection.abort_writer(writer)
        finally:
            if connection.expiry_timer is not None:
                connection.expiry_timer.cancel()
            for task in (writer, receiver):
                task.cancel()
            await asyncio.gather(writer, receiver, return_exceptions=True)

    async def _receive(self, connection: Connection, room_id: str | None) -> None:
        try:
            await self._receive_frames(connection, room_id)
        except Exception as exc:
            if is_storage_failure(exc):
                connection.close(1013, "storage unavailable: reconnect with backoff and resume")
                return
            log.exception("connection failed", extra={"connection_id": connection.id})
            connection.close(1011, "internal error: reconnect with backoff and resume")

    async def _receive_frames(self, connection: Connection, room_id: str | None) -> None:
        websocket = connection.websocket
        if room_id is not None and not await self._join_at_connect(connection, room_id):
            return
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                connection.peer_close_code = message.get("code")
                return
            text = message.get("text")
            if text is None:
                self._error(
                    connection, "invalid_frame", "Binary frames are not supported: send JSON text"
                )
                continue
            await self._handle(connection, text)

    async def _join_at_connect(self, connection: Connection, room_id: str) -> bool:
        if "\x00" in room_id:
            connection.close(4404, "room not found")
            return False
        try:
            await self._join(connection, frames.Join(type="join", room_id=room_id))
        except (DomainError, ValidationError):
            connection.close(4404, "room not found")
            return False
        return True

    def _arm_expiry(self, connection: Connection) -> None:
        """Warn EXPIRING_NOTICE_S before the access token expires and close 4401 when it
        does; called again by the timer it sets, and by `auth.refresh`."""
        if connection.expiry_timer is not None:
            connection.expiry_timer.cancel()
            connection.expiry_timer = None
        remaining = (connection.expires_at - utcnow()).total_seconds()
        if remaining <= 0:
            connection.close(4401, "access token expired")
            return
        warned = connection.expiry_warned_for == connection.expires_at
        if not warned and remaining <= EXPIRING_NOTICE_S:
            frame = frames.AuthExpiring(expires_at=connection.expires_at)
            connection.offer(Outbound(frame.encode()))
            connection.expiry_warned_for = connection.expires_at
            warned = True
        wait = remaining if warned else remaining - EXPIRING_NOTICE_S
        connection.expiry_timer = asyncio.get_running_loop().call_later(
            wait, self._arm_expiry, connection
        )

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: flush every connection's queue and close it 1012, within `timeout_s`."""
        self._draining = True
        for connection in self._hub.all_connections():
            connection.close(1012, "server restarting")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hub.idle.wait(), timeout_s)

    # --- handshake ---------------------------------------------------------------------------

    async def _authenticate(self, websocket: WebSocket) -> Principal:
        if self._draining:
            raise Refused(1012, "server restarting")
        self._check_origin(websocket)
        query = websocket.query_params
        if "access_token" in query or "token" in query:
            raise Refused(4401, "tokens are not accepted in the URL: use a ticket")
        try:
            principal = await self._principal(websocket)
        except Refused:
            raise
        except Unauthorized as exc:
            raise Refused(4401, exc.code) from exc
        except Forbidden as exc:
            raise Refused(4403, exc.code) from exc
        except DomainError as exc:
            raise Refused(4401, exc.code) from exc
        except Exception as exc:
            if is_storage_failure(exc):
                raise Refused(1013, "storage unavailable: retry with backoff") from exc
            log.exception("websocket authentication failed")
            raise Refused(1011, "internal error: reconnect with backoff") from exc
        return principal

    async def _claim_connection(self, principal: Principal) -> None:
        limit = self._settings.max_connections_per_user
        if not await self._presence.claim_connection(principal.user.id, limit):
            raise Refused(
                4429, f"too many connections for this user (limit {limit}): back off 30 s"
            )

    async def _principal(self, websocket: WebSocket) -> Principal:
        header = websocket.headers.get("authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Refused(4401, "malformed Authorization header")
            return await self._accounts.authenticate(token.strip())
        offered = websocket.scope.get("subprotocols", [])
        tokens = [
            p[len(frames.BEARER_PREFIX) :] for p in offered if p.startswith(frames.BEARER_PREFIX)
        ]
        if tokens:
            if frames.PROTOCOL not in offered:
                raise Refused(4401, f"offer the {frames.PROTOCOL} subprotocol with the token")
            return await self._accounts.authenticate(tokens[0])
        ticket = websocket.query_params.get("ticket")
        if ticket:
            return await self._accounts.redeem_ticket(ticket)
        raise Refused(4401, "credentials missing")

    def _check_origin(self, websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if origin is None:
            return  # not a browser: nothing to check
        scheme = "https" if websocket.url.scheme == "wss" else "http"
        same_origin = f"{scheme}://{websocket.headers.get('host', '')}"
        if origin != same_origin and origin not in self._settings.ws_allowed_origins:
            raise Refused(4403, "origin not allowed")

    def _hello(self, connection: Connection) -> frames.Hello:
        settings = self._settings
        return frames.Hello(
            user=connection.user,
            connection_id=connection.id,
            heartbeat_s=settings.heartbeat_interval_s,
            limits=frames.Limits(
                message_max_chars=settings.message_max_chars,
                frame_max_bytes=settings.frame_max_bytes,
                messages_per_s=settings.message_rate_per_s,
                message_burst=settings.message_burst,
                max_rooms=settings.max_rooms_per_connection,
            ),
            expires_at=connection.expires_at,
        )

    # --- frames ------------------------------------------------------------------------------

    async def _handle(self, connection: Connection, text: str) -> None:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._error(connection, "invalid_json", "The frame is not valid JSON")
            return
        if not isinstance(data, dict):
            self._error(connection, "invalid_frame", "A frame is a JSON object")
            return
        ref = data.get("ref")
        if isinstance(ref, bool) or not isinstance(ref, str | int):
            ref = None  # true would come back as 1 and match the wrong request
        if json_text_has_nul(text):  # Postgres cannot store one; no chat text needs one
            self._error(connection, "invalid_frame", "NUL characters are not allowed", ref)
            return
        frame_type = data.get("type")
        if not isinstance(frame_type, str) or frame_type not in frames.CLIENT_FRAMES:
            code = "unknown_type" if isinstance(frame_type, str) else "invalid_frame"
            self._error(connection, code, f"Unknown frame type: {str(frame_type)[:40]!r}", ref)
            return
        self._metrics.frame_received(frame_type)
        try:
            frame = frames.CLIENT_FRAMES[frame_type].model_validate(data)
        except ValidationError as exc:
            self._error(connection, "invalid_frame", _describe(exc), ref)
            return
        try:
            await self._handlers[frame_type](connection, frame)
        except Exception as exc:  # every failure answers with an error frame; the socket lives on
            self._fail(connection, frame_type, exc, ref)

    def _fail(
        self, connection: Connection, frame_type: str, exc: Exception, ref: str | int | None
    ) -> None:
        code, detail, retry_after = socket_error(exc)
        if code == "internal":
            log.error(
                "frame handler failed",
                extra={"connection_id": connection.id, "frame_type": frame_type},
                exc_info=exc,
            )
        elif code == "unavailable":
            log.warning(
                "storage unavailable",
                extra={"frame_type": frame_type, "error": type(exc).__name__},
            )
        self._error(connection, code, detail, ref, retry_after)

    def _error(
        self,
        connection: Connection,
        code: str,
        detail: str,
        ref: str | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        self._metrics.ws_error_frames.labels(code).inc()
        frame = frames.Error(code=code, detail=detail, ref=ref, retry_after=retry_after)
        connection.offer(Outbound(frame.encode()))

    async def _join(self, connection: Connection, frame: frames.Join) -> None:
        room_id = frame.room_id
        limit = self._settings.max_rooms_per_connection
        if room_id not in connection.rooms and len(connection.rooms) >= limit:
            raise Forbidden(f"Too many rooms on this connection (limit {limit})")
        await self._rooms.join(connection.user_id, room_id)
        connection.joining[room_id] = []
        self._hub.subscribe(connection, room_id)
        try:
            await self._fanout.watch(room_id)  # before the history read: no event slips by
            snapshot = await self._history.snapshot(
                connection.user_id,
                room_id,
                since_seq=frame.since_seq,
                limit=frame.limit or DEFAULT_HISTORY,
                cap=SINCE_SEQ_CAP,
            )
            online = await self._presence.online(room_id)
        except BaseException:
            self._hub.unsubscribe(connection, room_id)
            raise
        if room_id not in connection.rooms:  # removed, or the room deleted, meanwhile
            raise Forbidden("The subscription ended while joining")
        # A reply must fit the outbound queue: half its byte budget, the rest via REST.
        messages, cut = _fit(
            snapshot.messages,
            self._settings.outbound_queue_bytes // 2,
            keep_newest=frame.since_seq is None,
        )
        # frames.Joined, written straight from plain values: each message encoded once.
        joined: dict[str, Any] = {"type": "joined"}
        if frame.ref is not None:
            joined["ref"] = frame.ref
        joined |= {
            "room_id": room_id,
            "messages": messages,
            "last_seq": snapshot.last_seq,
            "truncated": snapshot.truncated or cut,
            "online": [user.model_dump() for user in online],
        }
        connection.offer(Outbound(frames.encode(joined)))
        self._hub.finish_join(connection, room_id, snapshot.last_seq)

    async def _leave(self, connection: Connection, frame: frames.Leave) -> None:
        self._hub.unsubscribe(connection, frame.room_id)
        connection.offer(Outbound(frames.Left(ref=frame.ref, room_id=frame.room_id).encode()))

    async def _send(self, connection: Connection, frame: frames.MessageSend) -> None:
        def acknowledge(sent: Sent) -> None:  # committed, not yet announced
            connection.offer(Outbound(frames.ack(frame.ref, frame.client_id, sent.fields)))

        # Pipelined: the next frames are read while this one waits for its commit (a
        # connection's sends are stored in order all the same), up to a bound in number and
        # in bytes, so that the acks of one batch always fit the connection's queue.
        size = len(frame.body.encode())
        budget = self._settings.outbound_queue_bytes // 4
        in_flight = connection.sends_in_flight
        while in_flight and (
            len(in_flight) >= MAX_SENDS_IN_FLIGHT or connection.send_bytes_in_flight + size > budget
        ):
            await asyncio.wait({in_flight[0]})
        pending = self._messages.enqueue(
            connection.user_id, frame.room_id, frame.body, frame.client_id, acknowledge
        )
        in_flight.append(pending)
        connection.send_bytes_in_flight += size
        settled = functools.partial(self._send_settled, connection, frame.ref, size)
        pending.add_done_callback(settled)

    def _send_settled(
        self,
        connection: Connection,
        ref: str | int | None,
        size: int,
        pending: asyncio.Future[Sent],
    ) -> None:
        """The send's batch is done: its ack went out when it committed; an error goes now."""
        connection.sends_in_flight.remove(pending)
        connection.send_bytes_in_flight -= size
        exc = None if pending.cancelled() else pending.exception()
        if not isinstance(exc, Exception):
            return
        if isinstance(exc, RateLimited):
            self._note_refusal(connection)
        self._fail(connection, "message.send", exc, ref)

    def _note_refusal(self, connection: Connection) -> None:
        """A client that keeps sending far past its limit is closed 4429."""
        refusals = connection.refused_sends
        now = time.monotonic()
        refusals.append(now)
        while refusals and now - refusals[0] > FLOOD_WINDOW_S:
            refusals.popleft()
        if len(refusals) > FLOOD_REFUSALS:
            connection.close(4429, f"sustained flooding: back off {FLOOD_BACKOFF_S} s")

    async def _typing(self, connection: Connection, frame: frames.Typing) -> None:
        if frame.room_id not in connection.rooms:
            raise Forbidden("Join the room first")
        if await self._limiter.allow(self._typing_rule, f"{frame.room_id}:{connection.user_id}"):
            self._events.publish(
                Event(
                    "typing",
                    {"user": connection.user.model_dump()},
                    room_id=frame.room_id,
                    user_id=connection.user_id,
                )
            )

    async def _read(self, connection: Connection, frame: frames.Read) -> None:
        await self._messages.mark_read(connection.user_id, frame.room_id, frame.seq)

    async def _ping(self, connection: Connection, frame: frames.Ping) -> None:
        connection.offer(Outbound(frames.Pong(ref=frame.ref).encode()))

    async def _auth_refresh(self, connection: Connection, frame: frames.AuthRefresh) -> None:
        principal = await self._accounts.authenticate(frame.access_token)
        if principal.user.id != connection.user_id:
            raise Forbidden("The new token belongs to another user")
        connection.expires_at = principal.expires_at
        self._hub.move_session(connection, principal.session_id)
        reply = frames.AuthRefreshed(ref=frame.ref, expires_at=principal.expires_at)
        connection.offer(Outbound(reply.encode()))
        self._arm_expiry(connection)  # after the reply: a new notice follows it


def _fit(
    messages: list[dict[str, Any]], budget: int, *, keep_newest: bool
) -> tuple[list[orjson.Fragment], bool]:
    """As many messages as fit in `budget` bytes of JSON, from the oldest (or the newest),
    each encoded once, as the frame embeds it (datetimes as pydantic writes them)."""
    ordered = reversed(messages) if keep_newest else iter(messages)
    kept: list[orjson.Fragment] = []
    used = 0
    for message in ordered:
        encoded = orjson.dumps(message, option=orjson.OPT_UTC_Z)
        used += len(encoded)
        if used > budget:
            break
        kept.append(orjson.Fragment(encoded))
    if keep_newest:
        kept.reverse()
    return kept, len(kept) < len(messages)


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "frame"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
