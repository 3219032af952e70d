"""The README's client examples run as written, against a real server, so they stay true.

The browser client (`fetch` + `WebSocket`) runs in Debian's headless Chromium, driven by
Playwright, on a page of the server's own origin; the Python client (`websockets` + `httpx`)
runs in a subprocess. Both talk to a real uvicorn server on a real port (in this process, so
the test can close a socket from the server side to exercise the browser client's resume).

What is checked is what a reader is promised: the `ack` carries the committed message with its
seq, a second user receives it live, the REST history holds it, and after a drop the browser
client's resumed `join` returns exactly the change it missed. A missing block fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import LiveServer
from tests.helpers import API, PASSWORD, bearer

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

README = Path(__file__).parents[1] / "README.md"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_S = 15.0  # generous: CI runs the Postgres and SQLite suites side by side
Frame = dict[str, Any]


def readme_block(marker: str, language: str) -> str:
    """The fenced block right after `<!-- tested: {marker} ... -->` in the README."""
    pattern = rf"<!-- tested: {re.escape(marker)}\b[^>]*-->\s*```{language}\n(.*?)```"
    match = re.search(pattern, README.read_text(), re.DOTALL)
    assert match, f"README.md has no ```{language} block marked <!-- tested: {marker} -->"
    return match.group(1)


# --- REST and a second user's socket -------------------------------------------------------


async def signup(client: httpx.AsyncClient, username: str) -> Frame:
    response = await client.post(
        f"{API}/auth/signup", json={"username": username, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    body: Frame = response.json()
    return body


async def create_room(client: httpx.AsyncClient, token: str) -> str:
    response = await client.post(f"{API}/rooms", json={"name": "general"}, headers=bearer(token))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def history(client: httpx.AsyncClient, token: str, room_id: str) -> list[Frame]:
    response = await client.get(f"{API}/rooms/{room_id}/messages", headers=bearer(token))
    assert response.status_code == 200, response.text
    items: list[Frame] = response.json()["items"]
    return items


async def next_frame(ws: ClientConnection, frame_type: str) -> Frame:
    """The next frame of `frame_type`, skipping others (presence and the like)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        frame: Frame = json.loads(raw)
        if frame["type"] == frame_type:
            return frame


@contextlib.asynccontextmanager
async def listener(live: LiveServer, token: str, room_id: str) -> AsyncIterator[ClientConnection]:
    """A second user's socket, joined to the room before the example sends anything."""
    async with connect(f"{live.ws}/ws", additional_headers=bearer(token)) as ws:
        await next_frame(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room_id": room_id}))
        joined = await next_frame(ws, "joined")
        assert joined["room_id"] == room_id
        yield ws


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.05)


def assert_stored(message: Frame, author: str, body: str) -> None:
    assert message["author"]["username"] == author
    assert message["body"] == body
    assert isinstance(message["seq"], int)
    assert message["seq"] >= 1
    assert message["change_seq"] == message["seq"]
    assert message["deleted"] is False


# --- the browser client --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; never a downloaded one. Missing, it fails the test."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `apt-get install -y --no-install-recommends chromium` "
            "(never `playwright install`).",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


# Before the README code runs: keep what it logs where the test can read it.
CAPTURE_CONSOLE = """() => {
    window.readmeLog = [];
    const log = console.log.bind(console);
    console.log = (...args) => { window.readmeLog.push(args); log(...args); };
}"""


class BrowserClient:
    """The README's browser code on a page of the server's origin, and what it logged."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.socket_urls: list[str] = []
        self.tickets_requested = 0
        self.release_tickets = asyncio.Event()
        self.release_tickets.set()
        page.on("pageerror", lambda error: self.errors.append(error.stack or str(error)))
        page.on("websocket", lambda socket: self.socket_urls.append(socket.url))

    async def _ticket(self, route: Route) -> None:
        """Ticket requests pass, unless held: a held one keeps the client offline."""
        self.tickets_requested += 1
        await asyncio.wait_for(self.release_tickets.wait(), WAIT_S)
        await route.continue_()

    async def start(self, live: LiveServer, code: str, **arguments: str) -> None:
        await self.page.route("**/api/v1/auth/ws-ticket", self._ticket)
        await self.page.goto(f"{live.http}/")
        await self.page.evaluate(CAPTURE_CONSOLE)
        # The README's functions, then its usage line with the test's values.
        script = f"async (args) => {{\n{code}\nwindow.chat = await startChat(args);\n}}"
        await self.page.evaluate(script, arguments)

    async def send(self, body: str) -> None:
        await self.page.evaluate("body => window.chat.send(body)", body)

    async def logged(self, frame_type: str | None = None) -> list[Frame]:
        """Frames the client logged as `console.log(frame.type, frame)`: all, or of one type."""
        entries: list[list[Any]] = await self.page.evaluate("() => window.readmeLog")
        frames = [entry[1] for entry in entries if len(entry) == 2 and isinstance(entry[1], dict)]
        return [frame for frame in frames if frame_type in (None, frame["type"])]

    async def wait_logged(self, frame_type: str, count: int = 1) -> list[Frame]:
        async def enough() -> bool:
            return len(await self.logged(frame_type)) >= count

        await wait_until(enough, f"the browser client to log {count} {frame_type!r}")
        return await self.logged(frame_type)


async def test_readme_browser_client(live: LiveServer) -> None:
    code = readme_block("browser client", "js")
    hub = live.app.state.hub
    text = "hello from the browser"
    async with httpx.AsyncClient(base_url=live.http) as client:
        alice = await signup(client, "alice")  # runs the README code
        bob = await signup(client, "bob")  # the second user: owns the room, listens
        room_id = await create_room(client, bob["access_token"])

        async with listener(live, bob["access_token"], room_id) as bob_ws, chromium() as browser:
            context = await browser.new_context()
            page = BrowserClient(await context.new_page())
            await page.start(live, code, username="alice", password=PASSWORD, roomId=room_id)
            (first_join,) = await page.wait_logged("joined")
            assert first_join["room_id"] == room_id
            assert first_join["messages"] == []

            # Send: the ack carries the committed message; Bob and the history have it.
            await page.send(text)
            (ack,) = await page.wait_logged("ack")
            sent = ack["message"]
            assert_stored(sent, "alice", text)
            assert ack["client_id"] == sent["client_id"]
            assert re.fullmatch(r"[0-9a-f-]{36}", sent["client_id"]), sent
            (echo,) = await page.wait_logged("message.new")
            assert echo["message"] == sent
            types = [frame["type"] for frame in await page.logged()]
            assert types.index("ack") < types.index("message.new"), types
            assert (await next_frame(bob_ws, "message.new"))["message"] == sent
            assert sent in await history(client, bob["access_token"], room_id)

            # A drop (the server restarts the socket) while Bob writes: the client reconnects
            # with a new ticket, and its resumed join brings exactly the message it missed.
            page.release_tickets.clear()  # keep it offline until Bob's message is stored
            for connection in hub.all_connections():
                if connection.user_id == alice["user"]["id"]:
                    connection.close(1012, "server restarting")

            async def alice_offline() -> bool:
                return bool(hub.connections_of(alice["user"]["id"]) == 0)

            await wait_until(alice_offline, "the browser client's socket to close")
            response = await client.post(
                f"{API}/rooms/{room_id}/messages",
                json={"body": "while alice was away"},
                headers=bearer(bob["access_token"]),
            )
            assert response.status_code == 201, response.text
            missed = response.json()
            page.release_tickets.set()
            first_join, resumed = await page.wait_logged("joined", 2)
            assert resumed["messages"] == [missed]
            assert missed["seq"] == sent["seq"] + 1
            assert resumed["last_seq"] == missed["seq"]
            assert len(await page.logged("hello")) == 2
            await context.close()

    assert page.errors == [], page.errors
    assert page.tickets_requested == 2
    # Two sockets, each with a one-time ticket and nothing else in the URL: never a token.
    assert len(page.socket_urls) == 2, page.socket_urls
    for url in page.socket_urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc, parts.path) == ("ws", f"127.0.0.1:{live.port}", "/ws")
        assert list(parse_qs(parts.query)) == ["ticket"], url
    tickets = {parse_qs(urlsplit(url).query)["ticket"][0] for url in page.socket_urls}
    assert len(tickets) == 2


# --- the Python client ---------------------------------------------------------------------


async def run_python_client(
    live: LiveServer, code: str, room_id: str, workdir: Path
) -> tuple[int, str, str]:
    script = workdir / "chat_client.py"
    script.write_text(code)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        room_id,
        cwd=workdir,
        env={
            **os.environ,
            "CHAT_SERVER": f"127.0.0.1:{live.port}",
            "CHAT_USERNAME": "carol",
            "CHAT_PASSWORD": PASSWORD,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_readme_python_client(live: LiveServer, tmp_path: Path) -> None:
    code = readme_block("python client", "python")
    async with httpx.AsyncClient(base_url=live.http) as client:
        carol = await signup(client, "carol")  # runs the README code
        dave = await signup(client, "dave")  # the second user: owns the room, listens
        room_id = await create_room(client, dave["access_token"])

        async with listener(live, dave["access_token"], room_id) as dave_ws:
            returncode, stdout, stderr = await run_python_client(live, code, room_id, tmp_path)
            assert returncode == 0, stderr
            frames = [json.loads(line) for line in stdout.splitlines()]
            types = [frame["type"] for frame in frames]
            assert types[:2] == ["hello", "joined"], types
            assert frames[0]["user"]["id"] == carol["user"]["id"]
            assert types[-1] == "message.new"
            # The ack first: the message is committed, with its seq; then it is broadcast.
            acks = [frame for frame in frames if frame["type"] == "ack"]
            assert len(acks) == 1, f"no ack before the message.new: {types}"
            ack = acks[0]
            sent = ack["message"]
            assert_stored(sent, "carol", "hello from Python")
            assert sent["room_id"] == room_id
            assert ack["client_id"] == sent["client_id"]
            assert frames[-1]["message"] == sent
            assert (await next_frame(dave_ws, "message.new"))["message"] == sent
        assert sent in await history(client, dave["access_token"], room_id)
