"""The WebSocket endpoints are served past FastAPI's router (api/ws.py): the same paths match as
the router matched them, others are still refused, and a socket keeps no HTTP layer's frame."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from chat_service.api.ws import _route_path, match_path
from tests.conftest import LiveServer
from tests.helpers import API, bearer, signup


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ws", (True, None)),
        ("/ws/rooms/r-1", (True, "r-1")),
        ("/ws/rooms/a b", (True, "a b")),  # the path is already %-decoded
        ("/ws/", (False, None)),
        ("/ws/rooms/", (False, None)),
        ("/ws/rooms/a/b", (False, None)),
        ("/wsx", (False, None)),
        ("/ws/other", (False, None)),
    ],
)
def test_paths_match_as_the_router_matched_them(
    path: str, expected: tuple[bool, str | None]
) -> None:
    assert match_path(path) == expected


def test_the_mount_point_is_left_out_of_the_path() -> None:
    assert _route_path({"path": "/chat/ws", "root_path": "/chat"}) == "/ws"
    assert _route_path({"path": "/ws", "root_path": ""}) == "/ws"
    assert _route_path({"path": "/chatter/ws", "root_path": "/chat"}) == "/chatter/ws"


async def test_other_websocket_paths_are_refused_and_ours_carry_a_request_id(
    live: LiveServer,
) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{live.ws}/ws/other"):
            pass
    assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=live.http) as client:
        token = (await signup(client, "wendy"))["access_token"]
        room = (await client.post(f"{API}/rooms", json={"name": "r"}, headers=bearer(token))).json()
    path = f"/ws/rooms/{room['id']}"
    async with websockets.connect(f"{live.ws}{path}", additional_headers=bearer(token)) as ws:
        assert ws.response.headers.get("X-Request-ID")
        assert json.loads(await ws.recv())["type"] == "hello"
        joined = json.loads(await ws.recv())
        assert (joined["type"], joined["room_id"]) == ("joined", room["id"])
        stacks = [_coroutine_names(task) for task in asyncio.all_tasks()]
        socket_stack = next(names for names in stacks if "Gateway.serve" in names)
        passed = {"HttpMetricsMiddleware.__call__", "InputGuard.__call__", "Router.__call__"}
        assert not passed & set(socket_stack), socket_stack


def _coroutine_names(task: asyncio.Task[object]) -> list[str]:
    """The qualified names of the coroutines a task is suspended in, outermost first."""
    names = []
    coroutine = task.get_coro()
    while coroutine is not None:
        code = getattr(coroutine, "cr_code", None)
        if code is None:
            break
        names.append(code.co_qualname)
        coroutine = coroutine.cr_await
    return names
