"""Baseline 2: a raw `websockets` broadcast server, the ceiling of the stack.

No framework, no authentication, no storage, no per-connection queue: a received
`message.send` is encoded once and handed to `websockets.broadcast()`, which writes it to
every socket of the room without awaiting any of them (a stalled reader only grows its own
write buffer). It speaks the same few frames as the tutorial baseline: `hello` on connect,
`join` -> `joined`, `message.send` -> `message.new` to the room, `ping` -> `pong`.

It runs on uvloop, like uvicorn does for chat-service, with compression off.

    python bench/baselines/raw_ws.py --port 8002
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from http import HTTPStatus

import orjson
import uvloop
from websockets.asyncio.server import Request, Response, ServerConnection, broadcast, serve

ROOMS: dict[str, set[ServerConnection]] = defaultdict(set)


async def handler(websocket: ServerConnection) -> None:
    joined: set[str] = set()
    await websocket.send('{"type":"hello"}')
    try:
        async for text in websocket:
            data = orjson.loads(text)
            kind = data.get("type")
            if kind == "join":
                room_id = data["room_id"]
                ROOMS[room_id].add(websocket)
                joined.add(room_id)
                reply = {"type": "joined", "ref": data.get("ref"), "room_id": room_id}
                await websocket.send(orjson.dumps(reply).decode())
            elif kind == "message.send":
                room_id = data["room_id"]
                message = {"room_id": room_id, "body": data["body"]}
                message["client_id"] = data.get("client_id")
                frame = {"type": "message.new", "room_id": room_id, "message": message}
                broadcast(ROOMS[room_id], orjson.dumps(frame).decode())
            elif kind == "ping":
                await websocket.send('{"type":"pong"}')
    finally:
        for room_id in joined:
            ROOMS[room_id].discard(websocket)


def health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def run(host: str, port: int) -> None:
    async with serve(
        handler, host, port, compression=None, process_request=health, max_size=65536
    ) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    uvloop.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
