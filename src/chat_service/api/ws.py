"""WebSocket endpoints, `/ws` and `/ws/rooms/{room_id}`: the protocol is in docs/protocol.md and
openapi/asyncapi.yaml.

They are served by a middleware just inside the request-id one, not by FastAPI's router: a
socket lives for hours, and every layer it passes (HTTP metrics, CORS, input guard, exception
middleware, FastAPI's exit stack, the router, the endpoint's dependency machinery) keeps its
coroutine frame for all that time and costs each handshake its call. None of them does
anything for a WebSocket. Any other WebSocket path still goes to the router, which refuses it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

WS_PATH = "/ws"
ROOM_PATH_PREFIX = "/ws/rooms/"


class WebSocketEndpoints:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            matched, room_id = match_path(_route_path(scope))
            if matched:
                gateway = scope["app"].state.gateway
                await gateway.serve(WebSocket(scope, receive, send), room_id)
                return
        await self.app(scope, receive, send)


def match_path(path: str) -> tuple[bool, str | None]:
    """(is it ours, the room id of `/ws/rooms/{room_id}`), as the router would match them."""
    if path == WS_PATH:
        return True, None
    if path.startswith(ROOM_PATH_PREFIX):
        room_id = path[len(ROOM_PATH_PREFIX) :]
        if room_id and "/" not in room_id:
            return True, room_id
    return False, None


def _route_path(scope: Scope) -> str:
    """The path below the mount point (`root_path`), as Starlette's router reads it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path
