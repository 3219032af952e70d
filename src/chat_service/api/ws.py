"""WebSocket endpoints: the protocol is in docs/protocol.md and openapi/asyncapi.yaml."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

router = APIRouter()


@router.websocket("/ws")
async def websocket(websocket: WebSocket) -> None:
    await websocket.app.state.gateway.serve(websocket)


@router.websocket("/ws/rooms/{room_id}")
async def websocket_in_room(websocket: WebSocket, room_id: str) -> None:
    await websocket.app.state.gateway.serve(websocket, room_id)
