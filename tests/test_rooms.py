"""Rooms and membership over REST: create, list, get, update, delete, join, leave, members.

Authorization comes first: a private room never reveals itself to someone outside it (404,
the same body as a room that does not exist), and a public room's outsiders may look but not
take part (403 `not_member`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from chat_service.domain.events import Event
from tests.conftest import AppFactory
from tests.helpers import API, bearer, signup
from tests.test_auth import assert_error

ROOM_FIELDS = {
    "id", "name", "description", "visibility", "owner_id", "created_at", "member_count",
}  # fmt: skip
ITEM_FIELDS = ROOM_FIELDS | {"role", "last_seq", "unread_count"}
MEMBERSHIP_FIELDS = {"room_id", "user", "role", "joined_at", "last_read_seq"}
MISSING_ROOM = "0" * 32


@dataclass(frozen=True)
class Account:
    id: str
    username: str
    headers: dict[str, str]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
async def app(app_factory: AppFactory) -> FastAPI:
    """These tests sign up more users than the default per-IP signup limit allows."""
    return await app_factory(signup_ip_limit="1000/hour")


@pytest.fixture
def events(app: FastAPI) -> Iterator[list[Event]]:
    seen: list[Event] = []
    unsubscribe = app.state.events.subscribe(seen.append)
    yield seen
    unsubscribe()


async def register(client: httpx.AsyncClient, username: str) -> Account:
    body = await signup(client, username)
    return Account(body["user"]["id"], body["user"]["username"], bearer(body["access_token"]))


@pytest.fixture
async def alice(client: httpx.AsyncClient) -> Account:
    return await register(client, "alice")


@pytest.fixture
async def bob(client: httpx.AsyncClient) -> Account:
    return await register(client, "bob")


@pytest.fixture
async def carol(client: httpx.AsyncClient) -> Account:
    return await register(client, "carol")


async def create_room(
    client: httpx.AsyncClient, headers: dict[str, str], **fields: Any
) -> dict[str, Any]:
    response = await client.post(f"{API}/rooms", json={"name": "room", **fields}, headers=headers)
    assert response.status_code == 201, response.text
    room: dict[str, Any] = response.json()
    return room


async def get_room(client: httpx.AsyncClient, who: Account, room_id: str) -> dict[str, Any]:
    response = await client.get(f"{API}/rooms/{room_id}", headers=who.headers)
    assert response.status_code == 200, response.text
    room: dict[str, Any] = response.json()
    return room


async def list_page(client: httpx.AsyncClient, who: Account, **params: Any) -> dict[str, Any]:
    response = await client.get(f"{API}/rooms", params=params, headers=who.headers)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    assert set(page) == {"items", "next_cursor"}
    return page


async def walk(
    client: httpx.AsyncClient, who: Account, path: str, **params: Any
) -> list[list[dict[str, Any]]]:
    """Every page of a cursor-paginated list, following next_cursor to the end."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"{API}{path}", params=query, headers=who.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "next_cursor never ends"


async def visible_rooms(client: httpx.AsyncClient, who: Account, **params: Any) -> list[str]:
    """Names of every room in my list, in list order, across all pages."""
    pages = await walk(client, who, "/rooms", **params)
    return [room["name"] for page in pages for room in page]


async def join(client: httpx.AsyncClient, who: Account, room_id: str) -> dict[str, Any]:
    response = await client.post(f"{API}/rooms/{room_id}/join", headers=who.headers)
    assert response.status_code == 200, response.text
    membership: dict[str, Any] = response.json()
    return membership


async def add_member(
    client: httpx.AsyncClient, owner: Account, room_id: str, username: str
) -> httpx.Response:
    return await client.post(
        f"{API}/rooms/{room_id}/members", json={"username": username}, headers=owner.headers
    )


async def send(client: httpx.AsyncClient, who: Account, room_id: str, body: str) -> int:
    response = await client.post(
        f"{API}/rooms/{room_id}/messages", json={"body": body}, headers=who.headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["seq"])


async def mark_read(client: httpx.AsyncClient, who: Account, room_id: str, seq: int) -> None:
    response = await client.post(
        f"{API}/rooms/{room_id}/read", json={"seq": seq}, headers=who.headers
    )
    assert response.status_code == 204, response.text


async def history(client: httpx.AsyncClient, who: Account, room_id: str) -> httpx.Response:
    return await client.get(f"{API}/rooms/{room_id}/messages", headers=who.headers)


async def member_ids(client: httpx.AsyncClient, who: Account, room_id: str) -> set[str]:
    pages = await walk(client, who, f"/rooms/{room_id}/members")
    return {member["user"]["id"] for page in pages for member in page}


async def count_rows(engine: AsyncEngine, table: str, **where: str) -> int:
    condition = " AND ".join(f"{column} = :{column}" for column in where)
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE {condition}"), where
        )
        return int(result.scalar_one())


def of_type(events: list[Event], event_type: str) -> list[Event]:
    return [event for event in events if event.type == event_type]


# --- create ---------------------------------------------------------------------------------


async def test_create_room_returns_it_and_makes_me_owner(
    client: httpx.AsyncClient, alice: Account
) -> None:
    room = await create_room(
        client, alice.headers, name="Lobby", description="Say hi", visibility="private"
    )
    assert set(room) == ROOM_FIELDS
    assert room["name"] == "Lobby"
    assert room["description"] == "Say hi"
    assert room["visibility"] == "private"
    assert room["owner_id"] == alice.id
    assert room["member_count"] == 1
    assert room["created_at"].endswith("Z") or room["created_at"].endswith("+00:00")
    assert room["id"]

    mine = await get_room(client, alice, room["id"])
    assert mine["role"] == "owner"
    assert {key: mine[key] for key in ROOM_FIELDS} == room
    members = await client.get(f"{API}/rooms/{room['id']}/members", headers=alice.headers)
    assert [(m["user"]["id"], m["role"]) for m in members.json()["items"]] == [(alice.id, "owner")]


async def test_create_room_defaults_to_public_without_description(
    client: httpx.AsyncClient, alice: Account
) -> None:
    room = await create_room(client, alice.headers, name="General")
    assert (room["visibility"], room["description"]) == ("public", "")


async def test_room_name_is_stripped_and_may_have_100_characters(
    client: httpx.AsyncClient, alice: Account
) -> None:
    assert (await create_room(client, alice.headers, name="  Lobby \t"))["name"] == "Lobby"
    long = await create_room(client, alice.headers, name=" " + "n" * 100 + " ")
    assert long["name"] == "n" * 100
    described = await create_room(client, alice.headers, description="d" * 1000)
    assert described["description"] == "d" * 1000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "n" * 101}, "name"),
        ({}, "name"),
        ({"name": None}, "name"),
        ({"name": "ok", "description": "d" * 1001}, "description"),
        ({"name": "ok", "visibility": "secret"}, "visibility"),
        ({"name": "ok", "owner_id": "someone-else"}, "owner_id"),
        ({"name": "ok", "member_count": 5}, "member_count"),
    ],
    ids=[
        "empty-name", "blank-name", "name-101", "no-name", "null-name",
        "description-1001", "bad-visibility", "unknown-owner_id", "unknown-member_count",
    ],
)  # fmt: skip
async def test_create_room_rejects_invalid_bodies(
    client: httpx.AsyncClient, alice: Account, body: dict[str, Any], field: str
) -> None:
    response = await client.post(f"{API}/rooms", json=body, headers=alice.headers)
    assert_error(response, 422, "invalid")
    assert ["body", field] in [error["loc"][:2] for error in response.json()["errors"]]
    assert (await list_page(client, alice))["items"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/rooms", {"name": "Other"}),
        ("GET", "/rooms", None),
        ("GET", "/rooms/{id}", None),
        ("PATCH", "/rooms/{id}", {"name": "Renamed"}),
        ("DELETE", "/rooms/{id}", None),
        ("POST", "/rooms/{id}/join", None),
        ("POST", "/rooms/{id}/leave", None),
        ("GET", "/rooms/{id}/members", None),
        ("POST", "/rooms/{id}/members", {"username": "alice"}),
        ("DELETE", "/rooms/{id}/members/{owner}", None),
    ],
)
async def test_room_endpoints_need_a_bearer_token(
    client: httpx.AsyncClient,
    alice: Account,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    url = API + path.format(id=room["id"], owner=alice.id)
    response = await client.request(method, url, json=body)
    assert_error(response, 401, "not_authenticated")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    forged = await client.request(method, url, json=body, headers=bearer("not-a-jwt"))
    assert forged.status_code == 401, forged.text
    # Nothing changed.
    assert await get_room(client, alice, room["id"]) == {
        **room,
        "role": "owner",
        "last_seq": 0,
        "unread_count": 0,
    }
    assert len((await list_page(client, alice))["items"]) == 1


# --- list -----------------------------------------------------------------------------------


async def test_list_shows_public_rooms_and_mine_but_never_others_private_rooms(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account
) -> None:
    await create_room(client, alice.headers, name="alice-public")
    await create_room(client, alice.headers, name="alice-private", visibility="private")
    shared = await create_room(client, alice.headers, name="alice-shared", visibility="private")
    await create_room(client, bob.headers, name="bob-private", visibility="private")
    assert (await add_member(client, alice, shared["id"], "carol")).status_code == 201

    assert await visible_rooms(client, alice) == ["alice-public", "alice-private", "alice-shared"]
    assert await visible_rooms(client, bob) == ["alice-public", "bob-private"]
    assert await visible_rooms(client, carol) == ["alice-public", "alice-shared"]


async def test_list_items_carry_my_role_and_read_state_only_for_my_rooms(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    owned = await create_room(client, alice.headers, name="owned")
    joined = await create_room(client, bob.headers, name="joined")
    other = await create_room(client, bob.headers, name="other")
    await join(client, alice, joined["id"])
    await send(client, bob, joined["id"], "hi")
    await send(client, bob, other["id"], "hi")

    items = {room["name"]: room for room in (await list_page(client, alice))["items"]}
    assert all(set(item) == ITEM_FIELDS for item in items.values())
    assert items["owned"] == {**owned, "role": "owner", "last_seq": 0, "unread_count": 0}
    assert items["joined"] == {
        **joined,
        "member_count": 2,
        "role": "member",
        "last_seq": 1,
        "unread_count": 1,
    }
    assert items["other"] == {
        **other,
        "role": None,
        "last_seq": None,
        "unread_count": None,
    }


async def test_list_is_oldest_first(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    names = [f"room-{i}" for i in range(6)]
    for i, name in enumerate(names):
        owner = alice if i % 2 else bob
        await create_room(client, owner.headers, name=name)
    assert await visible_rooms(client, alice) == names
    pages = await walk(client, alice, "/rooms", limit=4)
    times = [room["created_at"] for page in pages for room in page]
    assert times == sorted(times)


async def test_member_count_follows_joins_and_leaves(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    await join(client, bob, room["id"])
    await join(client, carol, room["id"])
    assert (await get_room(client, carol, room["id"]))["member_count"] == 3
    assert (await list_page(client, carol))["items"][0]["member_count"] == 3
    response = await client.post(f"{API}/rooms/{room['id']}/leave", headers=bob.headers)
    assert response.status_code == 204
    assert (await get_room(client, bob, room["id"]))["member_count"] == 2
    assert (await list_page(client, bob))["items"][0]["member_count"] == 2


# --- search ---------------------------------------------------------------------------------


async def test_search_is_a_case_insensitive_substring_of_the_name(
    client: httpx.AsyncClient, alice: Account
) -> None:
    for name in ("Python Users", "pythonistas", "Rustaceans", "CPython internals"):
        await create_room(client, alice.headers, name=name, description="python")
    assert await visible_rooms(client, alice, q="PYTHON") == [
        "Python Users",
        "pythonistas",
        "CPython internals",
    ]
    assert await visible_rooms(client, alice, q="thon u") == ["Python Users"]
    assert await visible_rooms(client, alice, q="rUsT") == ["Rustaceans"]
    assert await visible_rooms(client, alice, q="golang") == []


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("0%", ["100%"]),
        ("%", ["100%"]),
        ("_", ["a_b"]),
        ("a_b", ["a_b"]),
        ("\\", ["back\\slash"]),
        ("%_", []),
    ],
)
async def test_search_treats_wildcards_literally(
    client: httpx.AsyncClient, alice: Account, q: str, expected: list[str]
) -> None:
    for name in ("100%", "1000", "a_b", "ab", "axb", "back\\slash", "backslash"):
        await create_room(client, alice.headers, name=name)
    assert await visible_rooms(client, alice, q=q) == expected


async def test_search_never_finds_others_private_rooms(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    await create_room(client, alice.headers, name="secret plans", visibility="private")
    await create_room(client, alice.headers, name="secret garden")
    assert await visible_rooms(client, bob, q="secret") == ["secret garden"]
    assert await visible_rooms(client, alice, q="secret") == ["secret plans", "secret garden"]


# --- pagination -----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 9, 200])
async def test_pagination_walks_every_visible_room_once(
    client: httpx.AsyncClient, alice: Account, bob: Account, limit: int
) -> None:
    expected = []
    for i in range(10):
        owner = bob if i % 3 == 0 else alice  # bob: r0 r3 r6 r9
        visibility = "private" if i % 2 == 0 else "public"
        await create_room(client, owner.headers, name=f"r{i}", visibility=visibility)
        if owner is alice or visibility == "public":
            expected.append(f"r{i}")
    assert len(expected) == 8  # r0 and r6 are bob's private rooms

    pages = await walk(client, alice, "/rooms", limit=limit)
    names = [room["name"] for page in pages for room in page]
    assert names == expected  # none missed, none repeated, in order
    assert all(len(page) == limit for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= limit
    assert len(pages) == -(-len(expected) // limit)


async def test_pagination_combines_with_search(client: httpx.AsyncClient, alice: Account) -> None:
    for i in range(5):
        await create_room(client, alice.headers, name=f"match-{i}")
        await create_room(client, alice.headers, name=f"other-{i}")
    pages = await walk(client, alice, "/rooms", q="MATCH", limit=2)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [room["name"] for page in pages for room in page] == [f"match-{i}" for i in range(5)]


async def test_an_empty_list_has_no_next_cursor(client: httpx.AsyncClient, alice: Account) -> None:
    assert await list_page(client, alice) == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("limit", [0, 201, -1, "ten"])
async def test_list_limit_is_bounded(
    client: httpx.AsyncClient, alice: Account, limit: int | str
) -> None:
    response = await client.get(f"{API}/rooms", params={"limit": limit}, headers=alice.headers)
    assert_error(response, 422, "invalid")
    assert response.json()["errors"][0]["loc"] == ["query", "limit"]


@pytest.mark.parametrize("cursor", ["!!!", "a", "@@@@", "not a cursor"])
async def test_list_rejects_a_garbage_cursor(
    client: httpx.AsyncClient, alice: Account, cursor: str
) -> None:
    await create_room(client, alice.headers, name="Lobby")
    response = await client.get(f"{API}/rooms", params={"cursor": cursor}, headers=alice.headers)
    assert_error(response, 422, "invalid_cursor")
    assert response.json()["errors"] == [
        {"loc": ["query", "cursor"], "msg": response.json()["detail"], "type": "invalid_cursor"}
    ]


# --- unread counts --------------------------------------------------------------------------


async def test_unread_count_counts_others_messages_after_my_read_cursor(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    room_id = room["id"]
    await join(client, bob, room_id)
    for text in ("one", "two", "three"):
        await send(client, alice, room_id, text)
    last = await send(client, bob, room_id, "four")

    async def state(who: Account) -> tuple[int, int]:
        listed = (await list_page(client, who))["items"][0]
        got = await get_room(client, who, room_id)
        assert (listed["last_seq"], listed["unread_count"]) == (
            got["last_seq"],
            got["unread_count"],
        )
        return got["last_seq"], got["unread_count"]

    assert await state(bob) == (last, 3)  # alice's three; bob's own never count
    assert await state(alice) == (last, 1)  # only bob's
    await mark_read(client, bob, room_id, 2)
    assert await state(bob) == (last, 1)
    await mark_read(client, bob, room_id, last)
    assert await state(bob) == (last, 0)
    await send(client, bob, room_id, "five")
    assert await state(bob) == (last + 1, 0)
    await send(client, alice, room_id, "six")
    assert await state(bob) == (last + 2, 1)


async def test_a_deleted_message_stops_counting_as_unread(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room_id = (await create_room(client, alice.headers, name="Lobby"))["id"]
    await join(client, bob, room_id)
    first = await send(client, alice, room_id, "keep")
    second = await send(client, alice, room_id, "oops")
    assert (await get_room(client, bob, room_id))["unread_count"] == 2
    response = await client.delete(
        f"{API}/rooms/{room_id}/messages/{second}", headers=alice.headers
    )
    assert response.status_code == 204
    got = await get_room(client, bob, room_id)
    assert got["unread_count"] == 1
    assert got["last_seq"] == 3  # the delete took a seq of its own
    assert (await list_page(client, bob))["items"][0]["unread_count"] == 1
    await mark_read(client, bob, room_id, first)
    assert (await get_room(client, bob, room_id))["unread_count"] == 0


async def test_unread_count_of_a_new_member_counts_earlier_messages(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room_id = (await create_room(client, alice.headers, name="Lobby"))["id"]
    await send(client, alice, room_id, "before bob")
    membership = await join(client, bob, room_id)
    assert membership["last_read_seq"] == 0
    assert (await get_room(client, bob, room_id))["unread_count"] == 1


# --- get ------------------------------------------------------------------------------------


async def test_get_public_room_as_outsider_shows_no_read_state(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby", description="d")
    await send(client, alice, room["id"], "hello")
    got = await get_room(client, bob, room["id"])
    assert got == {**room, "role": None, "last_seq": None, "unread_count": None}
    listed = (await list_page(client, bob))["items"]
    assert listed == [got]


async def test_get_room_as_member_matches_its_list_item(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    assert (await add_member(client, alice, room["id"], "bob")).status_code == 201
    await send(client, alice, room["id"], "hello")
    got = await get_room(client, bob, room["id"])
    assert got == {**room, "member_count": 2, "role": "member", "last_seq": 1, "unread_count": 1}
    assert (await list_page(client, bob))["items"] == [got]


async def test_private_room_is_indistinguishable_from_a_missing_one(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    hidden = await client.get(f"{API}/rooms/{room['id']}", headers=bob.headers)
    missing = await client.get(f"{API}/rooms/{MISSING_ROOM}", headers=bob.headers)
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()
    assert hidden.status_code == missing.status_code


# --- update ---------------------------------------------------------------------------------


async def test_owner_updates_only_the_given_fields(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby", description="old")
    await join(client, bob, room["id"])
    url = f"{API}/rooms/{room['id']}"

    renamed = await client.patch(url, json={"name": "  Hall  "}, headers=alice.headers)
    assert renamed.status_code == 200, renamed.text
    assert set(renamed.json()) == ROOM_FIELDS
    assert renamed.json() == {**room, "name": "Hall", "member_count": 2}

    described = await client.patch(url, json={"description": "new"}, headers=alice.headers)
    assert described.json() == {**room, "name": "Hall", "description": "new", "member_count": 2}

    hidden = await client.patch(url, json={"visibility": "private"}, headers=alice.headers)
    expected = {**room, "name": "Hall", "description": "new", "visibility": "private"}
    assert hidden.json() == {**expected, "member_count": 2}
    assert (await client.patch(url, json={}, headers=alice.headers)).json() == hidden.json()

    got = await get_room(client, bob, room["id"])
    assert {key: got[key] for key in ROOM_FIELDS} == hidden.json()


async def test_making_a_room_private_hides_it_from_outsiders(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    await join(client, bob, room["id"])
    response = await client.patch(
        f"{API}/rooms/{room['id']}", json={"visibility": "private"}, headers=alice.headers
    )
    assert response.status_code == 200
    assert await visible_rooms(client, carol) == []
    assert_error(
        await client.get(f"{API}/rooms/{room['id']}", headers=carol.headers), 404, "room_not_found"
    )
    assert await visible_rooms(client, bob) == ["Lobby"]  # members keep it


@pytest.mark.parametrize(
    "body",
    [{"name": ""}, {"name": "  "}, {"name": "n" * 101}, {"description": "d" * 1001},
     {"visibility": "hidden"}, {"owner_id": "x"}, {"member_count": 9}],
    ids=["empty", "blank", "name-101", "description-1001", "visibility", "owner_id", "count"],
)  # fmt: skip
async def test_update_rejects_invalid_bodies(
    client: httpx.AsyncClient, alice: Account, body: dict[str, Any]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    response = await client.patch(f"{API}/rooms/{room['id']}", json=body, headers=alice.headers)
    assert_error(response, 422, "invalid")
    assert (await get_room(client, alice, room["id"]))["name"] == "Lobby"


async def test_only_the_owner_may_update(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account, events: list[Event]
) -> None:
    public = await create_room(client, alice.headers, name="Lobby")
    private = await create_room(client, alice.headers, name="Hideout", visibility="private")
    await join(client, bob, public["id"])
    assert (await add_member(client, alice, private["id"], "bob")).status_code == 201

    def patch(who: Account, room_id: str) -> Any:
        return client.patch(f"{API}/rooms/{room_id}", json={"name": "Mine"}, headers=who.headers)

    assert_error(await patch(bob, public["id"]), 403, "not_owner")
    assert_error(await patch(bob, private["id"]), 403, "not_owner")
    assert_error(await patch(carol, public["id"]), 403, "not_member")
    assert_error(await patch(carol, private["id"]), 404, "room_not_found")
    assert_error(await patch(alice, MISSING_ROOM), 404, "room_not_found")
    assert (await get_room(client, alice, public["id"]))["name"] == "Lobby"
    assert (await get_room(client, alice, private["id"]))["name"] == "Hideout"
    assert of_type(events, "room.updated") == []


async def test_update_publishes_room_updated(
    client: httpx.AsyncClient, alice: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    response = await client.patch(
        f"{API}/rooms/{room['id']}", json={"name": "Hall"}, headers=alice.headers
    )
    assert response.status_code == 200
    [event] = of_type(events, "room.updated")
    assert event.room_id == room["id"]
    assert event.data["room"]["name"] == "Hall"
    assert event.data["room"] == response.json()


# --- delete ---------------------------------------------------------------------------------


async def test_owner_deletes_a_room_with_its_messages_and_memberships(
    client: httpx.AsyncClient,
    alice: Account,
    bob: Account,
    engine: AsyncEngine,
    events: list[Event],
) -> None:
    room = await create_room(client, alice.headers, name="Doomed")
    keep = await create_room(client, alice.headers, name="Kept")
    await join(client, bob, room["id"])
    await send(client, alice, room["id"], "one")
    await send(client, bob, room["id"], "two")
    await send(client, alice, keep["id"], "stays")

    response = await client.delete(f"{API}/rooms/{room['id']}", headers=alice.headers)
    assert response.status_code == 204
    assert response.content == b""

    for who in (alice, bob):
        gone = await client.get(f"{API}/rooms/{room['id']}", headers=who.headers)
        assert_error(gone, 404, "room_not_found")
        assert_error(await history(client, who, room["id"]), 404, "room_not_found")
        assert await visible_rooms(client, who) == ["Kept"]
    assert await count_rows(engine, "messages", room_id=room["id"]) == 0
    assert await count_rows(engine, "memberships", room_id=room["id"]) == 0
    assert await count_rows(engine, "messages", room_id=keep["id"]) == 1
    [event] = of_type(events, "room.deleted")
    assert event.room_id == room["id"]
    assert event.data["room_id"] == room["id"]

    again = await client.delete(f"{API}/rooms/{room['id']}", headers=alice.headers)
    assert_error(again, 404, "room_not_found")


async def test_only_the_owner_may_delete(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account, events: list[Event]
) -> None:
    public = await create_room(client, alice.headers, name="Lobby")
    private = await create_room(client, alice.headers, name="Hideout", visibility="private")
    await join(client, bob, public["id"])
    assert (await add_member(client, alice, private["id"], "bob")).status_code == 201

    def delete(who: Account, room_id: str) -> Any:
        return client.delete(f"{API}/rooms/{room_id}", headers=who.headers)

    assert_error(await delete(bob, public["id"]), 403, "not_owner")
    assert_error(await delete(bob, private["id"]), 403, "not_owner")
    assert_error(await delete(carol, public["id"]), 403, "not_member")
    assert_error(await delete(carol, private["id"]), 404, "room_not_found")
    assert_error(await delete(alice, MISSING_ROOM), 404, "room_not_found")
    assert await visible_rooms(client, alice) == ["Lobby", "Hideout"]
    assert of_type(events, "room.deleted") == []


# --- join -----------------------------------------------------------------------------------


async def test_join_a_public_room(client: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    membership = await join(client, bob, room["id"])
    assert set(membership) == MEMBERSHIP_FIELDS
    assert membership["room_id"] == room["id"]
    assert membership["user"] == {"id": bob.id, "username": "bob", "display_name": "bob"}
    assert membership["role"] == "member"
    assert membership["last_read_seq"] == 0
    assert membership["joined_at"]
    got = await get_room(client, bob, room["id"])
    assert (got["role"], got["member_count"], got["unread_count"]) == ("member", 2, 0)
    assert await member_ids(client, bob, room["id"]) == {alice.id, bob.id}


async def test_joining_twice_changes_nothing(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    first = await join(client, bob, room["id"])
    second = await join(client, bob, room["id"])
    assert second == first
    assert (await get_room(client, bob, room["id"]))["member_count"] == 2
    # The owner "joining" stays the owner.
    owner = await join(client, alice, room["id"])
    assert (owner["role"], owner["user"]["id"]) == ("owner", alice.id)
    assert (await get_room(client, alice, room["id"]))["member_count"] == 2


async def test_joining_keeps_my_read_cursor(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room_id = (await create_room(client, alice.headers, name="Lobby"))["id"]
    await join(client, bob, room_id)
    seq = await send(client, alice, room_id, "hi")
    await mark_read(client, bob, room_id, seq)
    assert (await join(client, bob, room_id))["last_read_seq"] == seq


async def test_cannot_join_a_private_or_missing_room(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    hidden = await client.post(f"{API}/rooms/{room['id']}/join", headers=bob.headers)
    missing = await client.post(f"{API}/rooms/{MISSING_ROOM}/join", headers=bob.headers)
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()
    assert (await get_room(client, alice, room["id"]))["member_count"] == 1


async def test_concurrent_joins_make_one_membership(
    client: httpx.AsyncClient, alice: Account, bob: Account, engine: AsyncEngine
) -> None:
    # Several rooms at once, three joins each, so the race has many chances to happen.
    rooms = [(await create_room(client, alice.headers, name=f"r{i}"))["id"] for i in range(5)]
    responses = await asyncio.gather(
        *(
            client.post(f"{API}/rooms/{room_id}/join", headers=bob.headers)
            for room_id in rooms
            for _ in range(3)
        )
    )
    assert [r.status_code for r in responses] == [200] * 15, [r.text for r in responses]
    for i, room_id in enumerate(rooms):
        memberships = [r.json() for r in responses[3 * i : 3 * i + 3]]
        assert all(m["room_id"] == room_id and m["role"] == "member" for m in memberships)
        assert len({m["joined_at"] for m in memberships}) == 1
        assert await count_rows(engine, "memberships", room_id=room_id, user_id=bob.id) == 1
        assert (await get_room(client, bob, room_id))["member_count"] == 2


# --- leave ----------------------------------------------------------------------------------


async def test_leaving_a_public_room(
    client: httpx.AsyncClient, alice: Account, bob: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    await join(client, bob, room["id"])
    response = await client.post(f"{API}/rooms/{room['id']}/leave", headers=bob.headers)
    assert response.status_code == 204
    assert response.content == b""
    [listed] = (await list_page(client, bob))["items"]
    assert (listed["role"], listed["unread_count"], listed["member_count"]) == (None, None, 1)
    assert_error(await history(client, bob, room["id"]), 403, "not_member")
    [event] = of_type(events, "room.removed")
    assert (event.room_id, event.user_id) == (room["id"], bob.id)
    assert event.data == {"room_id": room["id"], "reason": "left"}


async def test_leaving_a_private_room_makes_it_disappear(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    assert (await add_member(client, alice, room["id"], "bob")).status_code == 201
    assert await visible_rooms(client, bob) == ["Hideout"]
    response = await client.post(f"{API}/rooms/{room['id']}/leave", headers=bob.headers)
    assert response.status_code == 204
    assert await visible_rooms(client, bob) == []
    assert_error(
        await client.get(f"{API}/rooms/{room['id']}", headers=bob.headers), 404, "room_not_found"
    )
    # And it cannot be re-entered by joining.
    again = await client.post(f"{API}/rooms/{room['id']}/join", headers=bob.headers)
    assert_error(again, 404, "room_not_found")


async def test_the_owner_cannot_leave(
    client: httpx.AsyncClient, alice: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    response = await client.post(f"{API}/rooms/{room['id']}/leave", headers=alice.headers)
    assert_error(response, 409, "owner_cannot_leave")
    got = await get_room(client, alice, room["id"])
    assert (got["role"], got["member_count"]) == ("owner", 1)
    assert of_type(events, "room.removed") == []


async def test_leaving_a_public_room_i_am_not_in_is_harmless(
    client: httpx.AsyncClient, alice: Account, bob: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    for _ in range(2):
        response = await client.post(f"{API}/rooms/{room['id']}/leave", headers=bob.headers)
        assert response.status_code == 204
    assert (await get_room(client, bob, room["id"]))["member_count"] == 1
    assert of_type(events, "room.removed") == []


async def test_cannot_leave_a_private_or_missing_room_i_am_not_in(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    hidden = await client.post(f"{API}/rooms/{room['id']}/leave", headers=bob.headers)
    missing = await client.post(f"{API}/rooms/{MISSING_ROOM}/leave", headers=bob.headers)
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()


# --- members --------------------------------------------------------------------------------


async def test_members_list_shows_roles_and_presence(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    joined = await join(client, bob, room["id"])
    response = await client.get(f"{API}/rooms/{room['id']}/members", headers=bob.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None
    items = {item["user"]["id"]: item for item in body["items"]}
    assert set(items) == {alice.id, bob.id}
    assert all(set(item) == MEMBERSHIP_FIELDS | {"online"} for item in items.values())
    assert items[bob.id] == {**joined, "online": False}
    assert items[alice.id]["role"] == "owner"
    assert items[alice.id]["user"] == {"id": alice.id, "username": "alice", "display_name": "alice"}
    assert items[alice.id]["online"] is False
    assert items[alice.id]["room_id"] == room["id"]


async def test_members_list_is_for_members_only(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    public = await create_room(client, alice.headers, name="Lobby")
    private = await create_room(client, alice.headers, name="Hideout", visibility="private")
    outsider_public = await client.get(f"{API}/rooms/{public['id']}/members", headers=bob.headers)
    assert_error(outsider_public, 403, "not_member")
    hidden = await client.get(f"{API}/rooms/{private['id']}/members", headers=bob.headers)
    missing = await client.get(f"{API}/rooms/{MISSING_ROOM}/members", headers=bob.headers)
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()


async def test_members_pagination_walks_every_member_once(
    client: httpx.AsyncClient, alice: Account
) -> None:
    room = await create_room(client, alice.headers, name="Crowd")
    expected = {alice.id}
    for i in range(5):
        member = await register(client, f"member{i}")
        await join(client, member, room["id"])
        expected.add(member.id)

    pages = await walk(client, alice, f"/rooms/{room['id']}/members", limit=1)
    ids = [item["user"]["id"] for page in pages for item in page]
    assert [len(page) for page in pages] == [1] * 6
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
    pages = await walk(client, alice, f"/rooms/{room['id']}/members", limit=4)
    assert [len(page) for page in pages] == [4, 2]
    assert {item["user"]["id"] for page in pages for item in page} == expected


@pytest.mark.parametrize("cursor", ["!!!", "a"])
async def test_members_rejects_a_garbage_cursor(
    client: httpx.AsyncClient, alice: Account, cursor: str
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    response = await client.get(
        f"{API}/rooms/{room['id']}/members", params={"cursor": cursor}, headers=alice.headers
    )
    assert_error(response, 422, "invalid_cursor")


# --- add member -----------------------------------------------------------------------------


async def test_owner_adds_a_member_by_username(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    added = await add_member(client, alice, room["id"], "bob")
    assert added.status_code == 201, added.text
    membership = added.json()
    assert set(membership) == MEMBERSHIP_FIELDS
    assert membership["room_id"] == room["id"]
    assert membership["user"] == {"id": bob.id, "username": "bob", "display_name": "bob"}
    assert (membership["role"], membership["last_read_seq"]) == ("member", 0)
    assert (await get_room(client, alice, room["id"]))["member_count"] == 2


async def test_adding_an_existing_member_changes_nothing(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    membership = (await add_member(client, alice, room["id"], "bob")).json()
    again = await add_member(client, alice, room["id"], "BoB")
    assert again.status_code == 200, again.text
    assert again.json() == membership
    owner = await add_member(client, alice, room["id"], "alice")
    assert owner.status_code == 200
    assert owner.json()["role"] == "owner"
    assert (await get_room(client, alice, room["id"]))["member_count"] == 2


async def test_username_lookup_is_case_insensitive(
    client: httpx.AsyncClient, alice: Account
) -> None:
    dave = await register(client, "Dave.Smith")
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    added = await add_member(client, alice, room["id"], "dAVE.sMITH")
    assert added.status_code == 201, added.text
    assert added.json()["user"] == {
        "id": dave.id,
        "username": "Dave.Smith",
        "display_name": "Dave.Smith",
    }


async def test_adding_is_the_way_into_a_private_room(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    await send(client, alice, room["id"], "welcome")
    assert await visible_rooms(client, bob) == []
    assert (await add_member(client, alice, room["id"], "bob")).status_code == 201

    assert await visible_rooms(client, bob) == ["Hideout"]
    got = await get_room(client, bob, room["id"])
    assert (got["role"], got["unread_count"], got["member_count"]) == ("member", 1, 2)
    messages = await history(client, bob, room["id"])
    assert messages.status_code == 200
    assert [m["body"] for m in messages.json()["items"]] == ["welcome"]
    assert await send(client, bob, room["id"], "thanks") == 2
    assert await member_ids(client, bob, room["id"]) == {alice.id, bob.id}


async def test_adding_an_unknown_username(client: httpx.AsyncClient, alice: Account) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    response = await add_member(client, alice, room["id"], "nobody")
    assert_error(response, 404, "user_not_found")
    assert (await get_room(client, alice, room["id"]))["member_count"] == 1


@pytest.mark.parametrize(
    "body", [{}, {"username": None}, {"username": "bob", "role": "owner"}], ids=str
)
async def test_add_member_rejects_invalid_bodies(
    client: httpx.AsyncClient, alice: Account, bob: Account, body: dict[str, Any]
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    response = await client.post(
        f"{API}/rooms/{room['id']}/members", json=body, headers=alice.headers
    )
    assert_error(response, 422, "invalid")
    assert (await get_room(client, alice, room["id"]))["member_count"] == 1


async def test_only_the_owner_may_add_members(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account
) -> None:
    public = await create_room(client, alice.headers, name="Lobby")
    private = await create_room(client, alice.headers, name="Hideout", visibility="private")
    await join(client, bob, public["id"])
    assert (await add_member(client, alice, private["id"], "bob")).status_code == 201

    assert_error(await add_member(client, bob, public["id"], "carol"), 403, "not_owner")
    assert_error(await add_member(client, bob, private["id"], "carol"), 403, "not_owner")
    assert_error(await add_member(client, carol, public["id"], "carol"), 403, "not_member")
    # An outsider cannot add themselves to a private room, nor learn that it exists.
    hidden = await add_member(client, carol, private["id"], "carol")
    missing = await add_member(client, carol, MISSING_ROOM, "carol")
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()
    assert await visible_rooms(client, carol) == ["Lobby"]
    assert await member_ids(client, alice, private["id"]) == {alice.id, bob.id}


# --- remove member --------------------------------------------------------------------------


async def test_owner_removes_a_member_of_a_private_room(
    client: httpx.AsyncClient, alice: Account, bob: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    assert (await add_member(client, alice, room["id"], "bob")).status_code == 201
    await send(client, alice, room["id"], "before")

    response = await client.delete(
        f"{API}/rooms/{room['id']}/members/{bob.id}", headers=alice.headers
    )
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await history(client, bob, room["id"]), 404, "room_not_found")
    assert_error(
        await client.get(f"{API}/rooms/{room['id']}", headers=bob.headers), 404, "room_not_found"
    )
    assert await visible_rooms(client, bob) == []
    assert await member_ids(client, alice, room["id"]) == {alice.id}
    assert (await get_room(client, alice, room["id"]))["member_count"] == 1
    [event] = of_type(events, "room.removed")
    assert (event.room_id, event.user_id) == (room["id"], bob.id)
    assert event.data == {"room_id": room["id"], "reason": "removed"}


async def test_a_removed_member_of_a_public_room_cannot_read_history(
    client: httpx.AsyncClient, alice: Account, bob: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    await join(client, bob, room["id"])
    assert (await history(client, bob, room["id"])).status_code == 200
    response = await client.delete(
        f"{API}/rooms/{room['id']}/members/{bob.id}", headers=alice.headers
    )
    assert response.status_code == 204
    assert_error(await history(client, bob, room["id"]), 403, "not_member")
    sent = await client.post(
        f"{API}/rooms/{room['id']}/messages", json={"body": "still here?"}, headers=bob.headers
    )
    assert_error(sent, 403, "not_member")
    got = await get_room(client, bob, room["id"])
    assert (got["role"], got["member_count"]) == (None, 1)


async def test_removing_someone_who_is_not_a_member(
    client: httpx.AsyncClient, alice: Account, bob: Account, events: list[Event]
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    for user_id in (bob.id, MISSING_ROOM):
        response = await client.delete(
            f"{API}/rooms/{room['id']}/members/{user_id}", headers=alice.headers
        )
        assert_error(response, 404, "member_not_found")
    assert of_type(events, "room.removed") == []


async def test_the_owner_cannot_remove_themselves(
    client: httpx.AsyncClient, alice: Account
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    response = await client.delete(
        f"{API}/rooms/{room['id']}/members/{alice.id}", headers=alice.headers
    )
    assert_error(response, 409, "owner_cannot_leave")
    assert (await get_room(client, alice, room["id"]))["role"] == "owner"


async def test_only_the_owner_may_remove_members(
    client: httpx.AsyncClient, alice: Account, bob: Account, carol: Account, events: list[Event]
) -> None:
    public = await create_room(client, alice.headers, name="Lobby")
    private = await create_room(client, alice.headers, name="Hideout", visibility="private")
    for room in (public, private):
        assert (await add_member(client, alice, room["id"], "bob")).status_code == 201

    def remove(who: Account, room_id: str, user_id: str) -> Any:
        return client.delete(f"{API}/rooms/{room_id}/members/{user_id}", headers=who.headers)

    assert_error(await remove(bob, public["id"], alice.id), 403, "not_owner")
    assert_error(await remove(bob, private["id"], alice.id), 403, "not_owner")
    assert_error(await remove(bob, private["id"], bob.id), 403, "not_owner")
    assert_error(await remove(carol, public["id"], bob.id), 403, "not_member")
    assert_error(await remove(carol, private["id"], bob.id), 404, "room_not_found")
    for room in (public, private):
        assert await member_ids(client, alice, room["id"]) == {alice.id, bob.id}
    assert of_type(events, "room.removed") == []


# --- the authorization matrix ---------------------------------------------------------------

# Every room-scoped request, with a body that would be valid for a member.
ROOM_REQUESTS = [
    ("GET", "", None),
    ("PATCH", "", {"name": "Taken over"}),
    ("DELETE", "", None),
    ("POST", "/join", None),
    ("POST", "/leave", None),
    ("GET", "/members", None),
    ("POST", "/members", {"username": "carol"}),
    ("DELETE", "/members/{owner}", None),
    ("GET", "/messages", None),
    ("POST", "/messages", {"body": "hello"}),
    ("PATCH", "/messages/1", {"body": "edited"}),
    ("DELETE", "/messages/1", None),
    ("POST", "/read", {"seq": 1}),
]
REQUEST_IDS = [f"{method} {path or '/'}" for method, path, _ in ROOM_REQUESTS]


@pytest.fixture
async def hideout(client: httpx.AsyncClient, alice: Account) -> dict[str, Any]:
    """alice's private room with one message in it."""
    room = await create_room(client, alice.headers, name="Hideout", visibility="private")
    await send(client, alice, room["id"], "secret")
    return room


async def request_room(
    client: httpx.AsyncClient,
    who: Account,
    room_id: str,
    request: tuple[str, str, dict[str, Any] | None],
    owner_id: str,
) -> httpx.Response:
    method, path, body = request
    url = f"{API}/rooms/{room_id}{path.format(owner=owner_id)}"
    return await client.request(method, url, json=body, headers=who.headers)


@pytest.mark.parametrize("request_", ROOM_REQUESTS, ids=REQUEST_IDS)
async def test_another_users_private_room_is_invisible_everywhere(
    client: httpx.AsyncClient,
    alice: Account,
    bob: Account,
    carol: Account,
    hideout: dict[str, Any],
    request_: tuple[str, str, dict[str, Any] | None],
) -> None:
    hidden = await request_room(client, bob, hideout["id"], request_, alice.id)
    missing = await request_room(client, bob, MISSING_ROOM, request_, alice.id)
    assert_error(hidden, 404, "room_not_found")
    assert hidden.json() == missing.json()
    # Nothing about the room changed.
    assert await get_room(client, alice, hideout["id"]) == {
        **hideout,
        "role": "owner",
        "last_seq": 1,
        "unread_count": 0,
    }
    messages = (await history(client, alice, hideout["id"])).json()["items"]
    assert [(m["body"], m["deleted"]) for m in messages] == [("secret", False)]
    assert await visible_rooms(client, bob) == []


@pytest.mark.parametrize("request_", ROOM_REQUESTS, ids=REQUEST_IDS)
async def test_a_removed_member_loses_all_access_to_a_private_room(
    client: httpx.AsyncClient,
    alice: Account,
    bob: Account,
    carol: Account,
    hideout: dict[str, Any],
    request_: tuple[str, str, dict[str, Any] | None],
) -> None:
    assert (await add_member(client, alice, hideout["id"], "bob")).status_code == 201
    removed = await client.delete(
        f"{API}/rooms/{hideout['id']}/members/{bob.id}", headers=alice.headers
    )
    assert removed.status_code == 204
    response = await request_room(client, bob, hideout["id"], request_, alice.id)
    assert_error(response, 404, "room_not_found")
    assert await member_ids(client, alice, hideout["id"]) == {alice.id}


# What an outsider may do in a public room: look at it, join, leave; nothing else.
PUBLIC_OUTSIDER = {
    "GET /": (200, None),
    "PATCH /": (403, "not_member"),
    "DELETE /": (403, "not_member"),
    "POST /join": (200, None),
    "POST /leave": (204, None),
    "GET /members": (403, "not_member"),
    "POST /members": (403, "not_member"),
    "DELETE /members/{owner}": (403, "not_member"),
    "GET /messages": (403, "not_member"),
    "POST /messages": (403, "not_member"),
    "PATCH /messages/1": (403, "not_member"),
    "DELETE /messages/1": (403, "not_member"),
    "POST /read": (403, "not_member"),
}


@pytest.mark.parametrize("request_", ROOM_REQUESTS, ids=REQUEST_IDS)
async def test_an_outsider_of_a_public_room_may_only_look_join_and_leave(
    client: httpx.AsyncClient,
    alice: Account,
    bob: Account,
    carol: Account,
    request_: tuple[str, str, dict[str, Any] | None],
) -> None:
    room = await create_room(client, alice.headers, name="Lobby")
    await send(client, alice, room["id"], "hello")
    status, code = PUBLIC_OUTSIDER[f"{request_[0]} {request_[1] or '/'}"]
    response = await request_room(client, bob, room["id"], request_, alice.id)
    if code is None:
        assert response.status_code == status, response.text
    else:
        assert_error(response, status, code)
    got = await get_room(client, alice, room["id"])
    assert (got["name"], got["last_seq"]) == ("Lobby", 1)
    expected_members = {alice.id, bob.id} if request_[1] == "/join" else {alice.id}
    assert await member_ids(client, alice, room["id"]) == expected_members
