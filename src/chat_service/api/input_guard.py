"""Input no route can take, refused before any route runs.

- A request body over BODY_MAX_BYTES answers 413 (`too_large`): the largest legitimate body, a
  4000-character message, is a few KiB, and nothing else should be read into memory.
- A NUL character in the path, the query or the body answers 422 (`invalid`): Postgres cannot
  store one in text, and no chat text needs one. (SQLite could, so both backends refuse it
  here alike.) The WebSocket gateway refuses NUL in frames with `invalid_frame`.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_service.errors import error_response

BODY_MAX_BYTES = 64 * 1024
# A JSON \u0000 escape, not preceded by an escaping backslash ("\\u0000" is harmless text).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_TEXT_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def has_nul(data: bytes, *, url_encoded: bool) -> bool:
    """Does this body or query carry a NUL: raw, or %-encoded (forms, queries) or
    \\u-escaped (JSON)?"""
    if b"\x00" in data:
        return True
    if url_encoded:
        return b"%00" in data
    # The substring test first: it is a fast scan, the expression a slow one (every frame).
    return b"\\u0000" in data and _JSON_NUL.search(data) is not None


def json_text_has_nul(text: str) -> bool:
    if "\x00" in text:
        return True
    return "\\u0000" in text and _TEXT_JSON_NUL.search(text) is not None


class InputGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int = BODY_MAX_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or has_nul(scope["query_string"], url_encoded=True):
            await _nul_refused("path or query")(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        body, more = await self._read_body(receive)
        if body is None:
            await self._too_large()(scope, receive, send)
            return
        form = headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded")
        if has_nul(body, url_encoded=form):
            await _nul_refused("body")(scope, receive, send)
            return
        await self.app(scope, _replay(body, more, receive), send)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body (None if it is too large), and any non-body message read after it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, []
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), []

    def _too_large(self) -> ASGIApp:
        return error_response(
            413, "too_large", f"The request body is larger than {self.max_body_bytes} bytes"
        )


def _nul_refused(where: str) -> ASGIApp:
    error = {"loc": [where.split()[0]], "msg": "NUL characters are not allowed", "type": "nul"}
    return error_response(
        422, "invalid", f"The request {where} contains a NUL character", errors=[error]
    )


def _replay(body: bytes, after: list[Message], receive: Receive) -> Receive:
    """`receive` for the app: the body read here, then whatever the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *after]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
