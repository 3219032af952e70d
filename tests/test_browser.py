"""The demo web client (`/`) in a real browser: Debian's Chromium, driven by Playwright, against
a real uvicorn server in this process (so the test can also reach into the hub).

Two people chat: sign-up, rooms, live messages both ways, presence, typing, history after a
reload with scroll-back, unread counts, HTML shown as text, resuming after a network drop and
after a server-side close, logging out and in. A second test covers token refresh
(`auth.expiring`, a 401, a 4401). Screenshots go to test-output/screenshots/.

Playwright never downloads a browser here: the test needs /usr/bin/chromium
(`apt-get install -y --no-install-recommends chromium`) and fails, not skips, without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    WebSocket,
    async_playwright,
    expect,
)

from tests.conftest import LiveServer, LiveServerFactory
from tests.helpers import API, PASSWORD, bearer

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
HTML_BODY = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
BACKLOG = 55  # more than the 50 messages a `join` brings: the rest needs scroll-back
WAIT_MS = 10_000  # generous: CI may run the Postgres and SQLite suites side by side

expect.set_options(timeout=WAIT_MS)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; a missing one fails the test (in the test, not its setup)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing. The browser tests use Debian's Chromium and never download "
            "one: `apt-get update && apt-get install -y --no-install-recommends chromium` "
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


@pytest.fixture
async def live_chat(live_server_factory: LiveServerFactory) -> LiveServer:
    # The backlog is sent quickly over REST: raise the per-user burst for it.
    return await live_server_factory(message_burst=200)


class ChatPage:
    """One person's tab, through the page's `data-testid`s."""

    def __init__(self, name: str, context: BrowserContext, page: Page) -> None:
        self.name = name
        self.context = context
        self.page = page
        self.errors: list[str] = []
        self.socket_urls: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(error.stack or str(error)))
        page.on("websocket", self._socket_opened)
        page.set_default_timeout(WAIT_MS)

    def _socket_opened(self, socket: WebSocket) -> None:
        self.socket_urls.append(socket.url)

    @classmethod
    async def open(cls, browser: Browser, live: LiveServer, name: str) -> ChatPage:
        context = await browser.new_context(viewport={"width": 1100, "height": 700})
        page = await context.new_page()
        chat = cls(name, context, page)
        await page.goto(live.http + "/")
        return chat

    def by(self, test_id: str) -> Locator:
        return self.page.get_by_test_id(test_id)

    def room(self, name: str) -> Locator:
        return self.by("room").filter(has=self.page.locator(".room-name", has_text=f"# {name}"))

    def bodies(self) -> Locator:
        return self.by("messages").get_by_test_id("message-body")

    def online_user(self, name: str) -> Locator:
        return self.by("online-user").filter(has_text=re.compile(f"^{name}$"))

    async def sign_up(self) -> None:
        await self.by("username").fill(self.name)
        await self.by("password").fill(PASSWORD)
        await self.by("signup").click()
        await expect(self.by("me")).to_have_text(self.name)
        await self.live()

    async def live(self) -> None:
        await expect(self.by("status")).to_have_attribute("data-state", "live")

    async def open_room(self, name: str) -> None:
        await self.room(name).click()
        await expect(self.by("room-title")).to_have_text(f"# {name}")

    async def send(self, text: str) -> None:
        await self.by("composer").fill(text)
        await self.by("composer").press("Enter")

    async def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=SCREENSHOTS / f"{name}.png")


async def rest_login(client: httpx.AsyncClient, username: str) -> dict[str, str]:
    response = await client.post(
        f"{API}/auth/login", json={"username": username, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    return bearer(response.json()["access_token"])


async def rest_send(
    client: httpx.AsyncClient, headers: dict[str, str], room_id: str, body: str
) -> None:
    response = await client.post(
        f"{API}/rooms/{room_id}/messages", json={"body": body}, headers=headers
    )
    assert response.status_code == 201, response.text


# Keeps every status the page shows from now on, to say what a failed reconnect went through.
RECORD_STATUS = """() => {
  const status = document.getElementById("status");
  window.statusLog = [];
  const record = () => window.statusLog.push(`${status.dataset.state}: ${status.textContent}`);
  const watch = { attributes: true, childList: true, characterData: true, subtree: true };
  new MutationObserver(record).observe(status, watch);
}"""


async def wait_for(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def test_two_people_chat_in_the_browser(live_chat: LiveServer) -> None:
    async with chromium() as browser:
        await two_people_chat(live_chat, browser)


async def two_people_chat(live: LiveServer, browser: Browser) -> None:
    hub = live.app.state.hub
    alice = await ChatPage.open(browser, live, "alice")
    bob = await ChatPage.open(browser, live, "bob")
    await alice.sign_up()
    await bob.sign_up()

    # Alice creates a room; Bob finds it in the list and joins it.
    await alice.by("new-room-name").fill("general")
    await alice.by("create-room").click()
    await expect(alice.by("room-title")).to_have_text("# general")
    general = await alice.room("general").get_attribute("data-room-id")
    assert general
    await bob.by("refresh-rooms").click()
    await expect(bob.room("general")).to_contain_text("join")
    await bob.open_room("general")

    # Presence: each sees the other online.
    for page, other in ((alice, "bob"), (bob, "alice")):
        await expect(page.online_user(other)).to_have_count(1)
        await expect(page.online_user(page.name)).to_have_count(1)

    # Typing: Bob sees Alice typing, until her message arrives.
    await alice.by("composer").press_sequentially("hi bob", delay=20)
    await expect(bob.by("typing")).to_have_text("alice is typing…")
    await alice.by("composer").press("Enter")
    for page in (alice, bob):
        await expect(page.bodies()).to_have_text(["hi bob"])
    await expect(bob.by("typing")).to_have_text("")
    await expect(alice.by("messages").locator(".pending")).to_have_count(0)

    # Messages both ways; a body made of HTML stays text and runs nothing.
    await bob.send("hi alice")
    await bob.send(HTML_BODY)
    for page in (alice, bob):
        await expect(page.bodies()).to_have_text(["hi bob", "hi alice", HTML_BODY])
        assert await page.page.evaluate("() => window.__pwned") is None
        assert await page.by("messages").locator("img, b").count() == 0
    await alice.screenshot("01-alice-chatting")
    await bob.screenshot("02-bob-chatting")

    async with httpx.AsyncClient(base_url=live.http) as client:
        alice_api = await rest_login(client, "alice")
        bob_api = await rest_login(client, "bob")
        bob_id = (await client.get(f"{API}/users/me", headers=bob_api)).json()["id"]
        for n in range(1, BACKLOG + 1):
            await rest_send(client, alice_api, general, f"backlog {n}")
        await expect(bob.bodies().last).to_have_text(f"backlog {BACKLOG}")

        # A reload keeps the tab's session and room; history comes back, older pages on scroll.
        await bob.page.reload()
        await bob.live()
        await expect(bob.by("room-title")).to_have_text("# general")
        await expect(bob.bodies()).to_have_count(50)
        await expect(bob.bodies().first).to_have_text(f"backlog {BACKLOG - 49}")
        await expect(bob.online_user("alice")).to_have_count(1)
        await expect(bob.by("load-older")).to_be_visible()
        await bob.by("scroller").evaluate("element => { element.scrollTop = 0; }")
        await expect(bob.bodies()).to_have_count(BACKLOG + 3)
        await expect(bob.bodies().first).to_have_text("hi bob")
        await expect(bob.by("load-older")).to_be_hidden()
        await bob.screenshot("03-bob-after-reload-and-scroll-back")

        # Unread counts: a second room, a message Bob has not seen, read when he opens it.
        await alice.by("new-room-name").fill("random")
        await alice.by("create-room").click()
        await expect(alice.by("room-title")).to_have_text("# random")
        random = await alice.room("random").get_attribute("data-room-id")
        assert random
        await bob.by("refresh-rooms").click()
        await bob.open_room("random")
        await bob.open_room("general")
        await alice.send("anyone here?")
        await expect(bob.room("random").get_by_test_id("unread")).to_have_text("1")
        await bob.screenshot("04-bob-unread-badge")
        await bob.open_room("random")
        await expect(bob.bodies()).to_have_text(["anyone here?"])
        await expect(bob.room("random").get_by_test_id("unread")).to_have_count(0)

        async def bob_unread(room_id: str) -> int | None:
            rooms = (await client.get(f"{API}/rooms", headers=bob_api)).json()["items"]
            return next(r["unread_count"] for r in rooms if r["id"] == room_id)

        deadline = time.monotonic() + WAIT_MS / 1000
        while await bob_unread(random) != 0:  # the `read` frame is fire-and-forget
            assert time.monotonic() < deadline, "bob's read cursor did not move"
            await asyncio.sleep(0.05)

        # A network drop: what is sent meanwhile arrives after the reconnect, in the open room
        # and (as an unread count) in the other one; what Bob wrote offline goes out then.
        await bob.context.set_offline(True)
        await expect(bob.by("status")).to_have_attribute("data-state", "offline")
        await wait_for(lambda: hub.connections_of(bob_id) == 0, "bob's socket to close")
        await rest_send(client, alice_api, random, "sent while bob was offline")
        await rest_send(client, alice_api, general, "general while bob was offline")
        await bob.send("written offline")
        await expect(bob.by("messages").locator(".pending")).to_have_count(1)
        await expect(bob.by("online-user")).to_have_count(0)  # unknown while offline
        await bob.screenshot("05-bob-offline")
        await asyncio.sleep(0.3)
        await expect(bob.bodies()).to_have_text(["anyone here?", "written offline"])
        await bob.context.set_offline(False)
        await bob.live()
        await expect(bob.bodies()).to_have_text(
            ["anyone here?", "sent while bob was offline", "written offline"]
        )
        await expect(bob.by("messages").locator(".pending")).to_have_count(0)
        await expect(alice.bodies().last).to_have_text("written offline")
        await expect(bob.room("general").get_by_test_id("unread")).to_have_text("1")

        # The server closes the socket (a restart): the page reconnects with backoff, resumes.
        before = {c.id for c in hub.all_connections() if c.user_id == bob_id}
        assert len(before) == 1
        await bob.page.evaluate(RECORD_STATUS)
        for connection in hub.all_connections():
            if connection.user_id == bob_id:
                connection.close(1012, "server restarting")
        try:
            # Full-jitter backoff: a retry or two refused on a loaded CI machine can add 1-3 s.
            await wait_for(
                lambda: any(
                    c.id not in before for c in hub.all_connections() if c.user_id == bob_id
                ),
                "bob to reconnect after 1012",
                within=3 * WAIT_MS / 1000,
            )
        except AssertionError as exc:
            statuses = await bob.page.evaluate("window.statusLog")
            raise AssertionError(f"{exc}; the page's status went {statuses}") from exc
        await rest_send(client, alice_api, random, "after the restart")
        await expect(bob.bodies().last).to_have_text("after the restart")
        await bob.live()
        await expect(bob.online_user("alice")).to_have_count(1)
        await bob.screenshot("06-bob-after-reconnect")

    # Log out, a wrong password, log in again: the rooms and their history are still there.
    await bob.by("logout").click()
    await expect(bob.by("auth-view")).to_be_visible()
    await bob.by("username").fill("bob")
    await bob.by("password").fill("not the password")
    await bob.by("login").click()
    await expect(bob.by("auth-error")).not_to_be_empty()
    await bob.by("password").fill(PASSWORD)
    await bob.by("login").click()
    await bob.live()
    await bob.open_room("random")
    await expect(bob.bodies().last).to_have_text("after the restart")

    for page in (alice, bob):
        assert page.errors == [], f"{page.name}: uncaught errors {page.errors}"
        # The token travels in a subprotocol, never in the URL.
        assert page.socket_urls
        assert set(page.socket_urls) == {f"{live.ws}/ws"}, page.socket_urls


async def test_the_page_refreshes_its_tokens(live_server_factory: LiveServerFactory) -> None:
    # Access tokens that live 63 s: `auth.expiring` (60 s ahead) comes 3 s after connecting.
    live = await live_server_factory(access_token_ttl_s=63)
    async with chromium() as browser:
        await refreshes_tokens(live, browser)


async def refreshes_tokens(live: LiveServer, browser: Browser) -> None:
    hub = live.app.state.hub
    carol = await ChatPage.open(browser, live, "carol")
    await carol.sign_up()

    async def stored_token() -> str:
        session = await carol.page.evaluate("() => sessionStorage.getItem('chat.session')")
        return str(json.loads(session)["access_token"])

    first = await stored_token()
    (connection,) = hub.all_connections()
    expires_at = connection.expires_at
    await wait_for(lambda: connection.expires_at > expires_at, "auth.refresh on the socket")

    # A rejected access token (401 on REST, 4401 on the socket) is refreshed, not logged out.
    # Reload at once, 3 s before the next refresh: a reload that cut a refresh short would lose
    # the new refresh token after spending the old one (the session would end: by design).
    await carol.page.evaluate(
        """() => {
            const session = JSON.parse(sessionStorage.getItem('chat.session'));
            session.access_token = 'not-a-token';
            sessionStorage.setItem('chat.session', JSON.stringify(session));
        }"""
    )
    await carol.page.reload()
    await carol.live()
    await expect(carol.by("me")).to_have_text("carol")
    await carol.by("new-room-name").fill("after refresh")
    await carol.by("create-room").click()
    await expect(carol.by("room-title")).to_have_text("# after refresh")
    assert await stored_token() not in {"not-a-token", first}
    assert carol.errors == []
