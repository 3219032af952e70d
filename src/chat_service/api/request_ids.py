"""Request ids: one per HTTP request and WebSocket handshake, in the logs and the response.

A caller's own `X-Request-ID` is kept when it is sane (1-128 characters of letters, digits and
`._:-`, starting with a letter or digit), so a proxy's or client's id follows the request
through; anything else is replaced by a fresh id. The id is echoed in the `X-Request-ID`
response header (and in the WebSocket handshake response).
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_service.logging_config import request_id_var, request_started_var

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(value: str | None) -> str:
    """The caller's id if it is sane, else a new one."""
    if value is not None and _SANE.fullmatch(value):
        return value
    return uuid.uuid4().hex


def _incoming(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == _HEADER_KEY:
            return str(value.decode("latin-1"))
    return None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_incoming(scope))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            elif message["type"] == "websocket.accept":
                headers = list(message.get("headers", []))
                headers.append((_HEADER_KEY, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        id_token = request_id_var.set(request_id)
        started_token = request_started_var.set(time.perf_counter())
        # Reset only on success: after a failure, the error lines logged further out
        # (Starlette's error middleware, uvicorn) must still carry the id. Each request
        # runs in its own task, so the value cannot reach another request.
        await self.app(scope, receive, send_with_id)
        request_started_var.reset(started_token)
        request_id_var.reset(id_token)
