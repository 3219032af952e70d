"""Baseline 1: the tutorial-style FastAPI chat.

What the FastAPI WebSocket tutorial builds: one global ConnectionManager holding the open
sockets, no authentication, no storage, and a broadcast that awaits `send_text` for each
member in turn, from the handler of the socket that sent the message. The only additions
are the few frames of chat-service's protocol that the load generator speaks (`hello` on
connect, `join` -> `joined`, `message.send` -> `message.new` to the room, `ping` -> `pong`),
and rooms as lists in the same manager.

It runs on the same uvicorn and WebSocket implementation as chat-service (websockets-sansio,
per-message deflate off), so a comparison measures the application, not the stack.

    python bench/baselines/tutorial.py --port 8001
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


class ConnectionManager:
    def __init__(self) -> None:
        self.rooms: dict[str, list[WebSocket]] = defaultdict(list)

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text('{"type":"hello"}')

    def join(self, websocket: WebSocket, room_id: str) -> None:
        if websocket not in self.rooms[room_id]:
            self.rooms[room_id].append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        for members in self.rooms.values():
            if websocket in members:
                members.remove(websocket)

    async def broadcast(self, room_id: str, message: str) -> None:
        for connection in self.rooms[room_id]:
            await connection.send_text(message)


manager = ConnectionManager()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            kind = data.get("type")
            if kind == "join":
                manager.join(websocket, data["room_id"])
                reply = {"type": "joined", "ref": data.get("ref"), "room_id": data["room_id"]}
                await websocket.send_text(json.dumps(reply, separators=(",", ":")))
            elif kind == "message.send":
                message = {"room_id": data["room_id"], "body": data["body"]}
                message["client_id"] = data.get("client_id")
                frame = {"type": "message.new", "room_id": data["room_id"], "message": message}
                await manager.broadcast(data["room_id"], json.dumps(frame, separators=(",", ":")))
            elif kind == "ping":
                await websocket.send_text('{"type":"pong"}')
    except WebSocketDisconnect:
        manager.disconnect(websocket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
