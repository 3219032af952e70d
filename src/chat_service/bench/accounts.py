"""Users and rooms for a run, through the target's public API.

chat-service: users sign up over REST (each signup hashes a password: ~20 ms of server CPU),
rooms are created over REST and members join over the WebSocket. The baselines have no
accounts: a "user" is a name and a room is any string.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

API = "/api/v1"
PASSWORD = "bench password 0123456789"
Protocol = Literal["chat", "baseline"]


@dataclass(frozen=True)
class Account:
    username: str
    user_id: str
    token: str | None  # None for the baselines (no authentication)

    def ws_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class ApiError(Exception):
    """The service under test answered a setup call (signup, room, ticket) unexpectedly."""


def _check(response: httpx.Response, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise ApiError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Population:
    """Accounts and rooms made on one target (or one database), reused across its runs."""

    protocol: Protocol
    base_url: str
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    accounts: list[Account] = field(default_factory=list)
    rooms: dict[str, str] = field(default_factory=dict)  # our name -> room id

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=60)

    async def ensure_accounts(self, count: int, concurrency: int = 8) -> list[Account]:
        """At least `count` accounts; the first `count` are returned."""
        missing = range(len(self.accounts), count)
        if self.protocol == "baseline":
            self.accounts.extend(Account(f"u{i}", f"u{i}", None) for i in missing)
            return self.accounts[:count]
        gate = asyncio.Semaphore(concurrency)
        async with self.client() as http:

            async def one(i: int) -> Account:
                async with gate:
                    return await signup(http, f"b{self.tag}u{i}")

            self.accounts.extend(await asyncio.gather(*(one(i) for i in missing)))
        return self.accounts[:count]

    async def ensure_room(self, name: str, owner: Account) -> str:
        if name not in self.rooms:
            if self.protocol == "baseline":
                self.rooms[name] = f"{self.tag}-{name}"
            else:
                async with self.client() as http:
                    self.rooms[name] = await create_room(http, owner, name)
        return self.rooms[name]

    async def ensure_rooms(self, names: list[str], owners: list[Account]) -> list[str]:
        if self.protocol == "baseline":
            return [
                await self.ensure_room(name, owner)
                for name, owner in zip(names, owners, strict=True)
            ]
        gate = asyncio.Semaphore(8)
        async with self.client() as http:

            async def one(name: str, owner: Account) -> None:
                if name not in self.rooms:
                    async with gate:
                        self.rooms[name] = await create_room(http, owner, name)

            await asyncio.gather(*(one(n, o) for n, o in zip(names, owners, strict=True)))
        return [self.rooms[name] for name in names]


async def signup(http: httpx.AsyncClient, username: str) -> Account:
    body = _check(
        await http.post(f"{API}/auth/signup", json={"username": username, "password": PASSWORD}),
        201,
    )
    return Account(username, body["user"]["id"], body["access_token"])


async def login(http: httpx.AsyncClient, username: str) -> httpx.Response:
    return await http.post(f"{API}/auth/login", json={"username": username, "password": PASSWORD})


async def create_room(http: httpx.AsyncClient, owner: Account, name: str) -> str:
    body = _check(
        await http.post(
            f"{API}/rooms",
            json={"name": name, "visibility": "public"},
            headers=owner.ws_headers(),
        ),
        201,
    )
    return str(body["id"])
