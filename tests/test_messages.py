"""Messages over REST: history paging, idempotent sends, edits, deletes, read cursors, seqs."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from chat_service.domain.events import Event
from chat_service.realtime.fanout import decode_event, encode_event
from tests.conftest import AppFactory, client_for
from tests.helpers import API, bearer, signup
from tests.test_auth import assert_error

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

Headers = dict[str, str]


async def make_user(client: httpx.AsyncClient, name: str) -> Headers:
    return bearer((await signup(client, name))["access_token"])


async def make_room(client: httpx.AsyncClient, owner: Headers, **fields: Any) -> str:
    response = await client.post(f"{API}/rooms", json={"name": "room", **fields}, headers=owner)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def send(
    client: httpx.AsyncClient, room: str, who: Headers, body: str, **extra: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/rooms/{room}/messages", json={"body": body, **extra}, headers=who
    )


async def history(
    client: httpx.AsyncClient, room: str, who: Headers, **params: Any
) -> dict[str, Any]:
    response = await client.get(f"{API}/rooms/{room}/messages", params=params, headers=who)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def chat(client: httpx.AsyncClient) -> tuple[str, Headers, Headers]:
    """A public room owned by alice, which bob has joined."""
    alice = await make_user(client, "alice")
    bob = await make_user(client, "bob")
    room = await make_room(client, alice)
    assert (await client.post(f"{API}/rooms/{room}/join", headers=bob)).status_code == 200
    return room, alice, bob


@pytest.fixture
def events(app: FastAPI) -> list[Event]:
    """The events published, as the broker carries them to every worker's hub."""
    seen: list[Event] = []
    app.state.events.subscribe(lambda event: seen.append(decode_event(encode_event(event))))
    return seen


# --- send -----------------------------------------------------------------------------------


async def test_send_returns_the_stored_message(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], events: list[Event]
) -> None:
    room, alice, _ = chat
    response = await send(client, room, alice, "hello <b>world</b>", client_id="c-1")
    assert response.status_code == 201
    message = response.json()
    assert set(message) == {
        "id", "room_id", "seq", "change_seq", "author", "body", "client_id",
        "created_at", "edited_at", "deleted",
    }  # fmt: skip
    assert message["seq"] == message["change_seq"] == 1
    assert message["body"] == "hello <b>world</b>"  # stored as sent: escaping is the client's
    assert message["author"]["username"] == "alice"
    assert (message["client_id"], message["edited_at"], message["deleted"]) == ("c-1", None, False)
    assert [(e.type, e.room_id, e.data["message"]) for e in events] == [
        ("message.new", room, message)
    ]


async def test_repeated_client_id_returns_the_original(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], events: list[Event]
) -> None:
    room, alice, bob = chat
    first = await send(client, room, alice, "once", client_id="same")
    again = await send(client, room, alice, "once, retried", client_id="same")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    # client_ids are per author: bob may use the same one.
    assert (await send(client, room, bob, "mine", client_id="same")).status_code == 201
    assert len(events) == 2
    assert len((await history(client, room, alice))["items"]) == 2


async def test_concurrent_resends_store_one_message(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, _ = chat
    responses = await asyncio.gather(
        *(send(client, room, alice, "flaky network", client_id="retry-me") for _ in range(6))
    )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    page = await history(client, room, alice)
    assert [m["seq"] for m in page["items"]] == [1]
    # The losers' seqs were rolled back with them: the next message takes seq 2.
    assert (await send(client, room, alice, "next")).json()["seq"] == 2


async def test_client_id_reused_in_another_room_is_a_conflict(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, _ = chat
    other = await make_room(client, alice, name="other")
    await send(client, room, alice, "here", client_id="c-9")
    assert_error(
        await send(client, other, alice, "there", client_id="c-9"), 409, "client_id_reused"
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [("", "invalid"), ("   \n\t", "invalid"), ("x" * 4001, "too_large")],
    ids=["empty", "whitespace", "4001"],
)
async def test_body_limits(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], body: str, code: str
) -> None:
    room, alice, _ = chat
    response = await send(client, room, alice, body)
    assert_error(response, 422, code)
    assert response.json()["errors"][0]["loc"] == ["body", "body"]


async def test_body_of_4000_characters_and_unicode(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, _ = chat
    longest = "é" * 3999 + "🙂"  # 4000 characters, more than 4000 bytes
    response = await send(client, room, alice, longest)
    assert response.status_code == 201
    assert response.json()["body"] == longest


@pytest.mark.parametrize(
    "client_id", ["", "x" * 65, "has space", "ünïcode"], ids=["empty", "65", "space", "unicode"]
)
async def test_client_id_format(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], client_id: str
) -> None:
    room, alice, _ = chat
    assert_error(await send(client, room, alice, "hi", client_id=client_id), 422, "invalid")


async def test_author_cannot_be_forged(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, bob = chat
    alice_id = (await client.get(f"{API}/users/me", headers=alice)).json()["id"]
    forged = await send(client, room, bob, "I am alice", author_id=alice_id)
    assert_error(forged, 422, "invalid")
    forged = await send(client, room, bob, "I am alice", author={"id": alice_id})
    assert_error(forged, 422, "invalid")
    assert (await history(client, room, alice))["items"] == []


async def test_outsiders_cannot_send_or_read(client: httpx.AsyncClient) -> None:
    alice = await make_user(client, "alice")
    eve = await make_user(client, "eve")
    public = await make_room(client, alice)
    private = await make_room(client, alice, visibility="private")
    assert_error(await send(client, public, eve, "hi"), 403, "not_member")
    assert_error(await send(client, private, eve, "hi"), 404, "room_not_found")
    response = await client.get(f"{API}/rooms/{private}/messages", headers=eve)
    assert_error(response, 404, "room_not_found")
    response = await client.get(f"{API}/rooms/{public}/messages", headers=eve)
    assert_error(response, 403, "not_member")
    assert_error(await send(client, "no-such-room", alice, "hi"), 404, "room_not_found")


async def test_kicked_member_loses_access(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    _, alice, _ = chat
    carol = await make_user(client, "carol")
    private = await make_room(client, alice, visibility="private")
    added = await client.post(
        f"{API}/rooms/{private}/members", json={"username": "carol"}, headers=alice
    )
    assert added.status_code == 201
    await send(client, private, carol, "I'm in")
    carol_id = added.json()["user"]["id"]
    kicked = await client.delete(f"{API}/rooms/{private}/members/{carol_id}", headers=alice)
    assert kicked.status_code == 204
    response = await client.get(f"{API}/rooms/{private}/messages", headers=carol)
    assert_error(response, 404, "room_not_found")
    assert_error(await send(client, private, carol, "still here?"), 404, "room_not_found")
    edit = await client.patch(
        f"{API}/rooms/{private}/messages/1", json={"body": "edited"}, headers=carol
    )
    assert_error(edit, 404, "room_not_found")


# --- edit and delete ------------------------------------------------------------------------


async def test_edit_takes_a_new_change_seq(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], events: list[Event]
) -> None:
    room, alice, bob = chat
    await send(client, room, alice, "first")
    await send(client, room, bob, "second")
    response = await client.patch(
        f"{API}/rooms/{room}/messages/1", json={"body": "first, fixed"}, headers=alice
    )
    assert response.status_code == 200
    edited = response.json()
    assert (edited["seq"], edited["change_seq"], edited["body"]) == (1, 3, "first, fixed")
    assert edited["edited_at"] is not None
    assert events[-1].type == "message.updated"
    assert events[-1].data["message"] == edited
    changed = await history(client, room, bob, after_seq=2)
    assert changed["items"] == [edited]


async def test_only_the_author_edits(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, bob = chat
    await send(client, room, bob, "bob's")
    # Not even the room's owner may put words in bob's mouth.
    response = await client.patch(
        f"{API}/rooms/{room}/messages/1", json={"body": "owned"}, headers=alice
    )
    assert_error(response, 403, "not_author")
    missing = await client.patch(f"{API}/rooms/{room}/messages/9", json={"body": "x"}, headers=bob)
    assert_error(missing, 404, "message_not_found")
    too_long = await client.patch(
        f"{API}/rooms/{room}/messages/1", json={"body": "x" * 4001}, headers=bob
    )
    assert_error(too_long, 422, "too_large")
    assert (await history(client, room, bob))["items"][0]["body"] == "bob's"
    # A refused edit takes no seq.
    assert (await send(client, room, bob, "next")).json()["seq"] == 2


async def test_delete_leaves_a_tombstone(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], events: list[Event]
) -> None:
    room, alice, bob = chat
    await send(client, room, bob, "regrettable")
    await send(client, room, bob, "fine")
    assert (await client.delete(f"{API}/rooms/{room}/messages/1", headers=bob)).status_code == 204
    tombstone = (await history(client, room, alice))["items"][0]
    assert (tombstone["seq"], tombstone["change_seq"]) == (1, 3)
    assert (tombstone["body"], tombstone["deleted"]) == ("", True)
    assert events[-1].type == "message.deleted"
    assert events[-1].data["message"] == tombstone
    # Deleting again changes nothing; editing a tombstone is refused.
    assert (await client.delete(f"{API}/rooms/{room}/messages/1", headers=bob)).status_code == 204
    edit = await client.patch(f"{API}/rooms/{room}/messages/1", json={"body": "x"}, headers=bob)
    assert_error(edit, 409, "message_deleted")
    assert (await history(client, room, alice))["items"][0]["change_seq"] == 3
    assert [e.type for e in events] == ["message.new", "message.new", "message.deleted"]


async def test_owner_may_delete_others_messages_members_may_not(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, bob = chat
    carol = await make_user(client, "carol")
    await client.post(f"{API}/rooms/{room}/join", headers=carol)
    await send(client, room, bob, "bob 1")
    await send(client, room, alice, "alice 1")
    response = await client.delete(f"{API}/rooms/{room}/messages/2", headers=carol)
    assert_error(response, 403, "not_author")
    response = await client.delete(f"{API}/rooms/{room}/messages/2", headers=bob)
    assert_error(response, 403, "not_author")
    assert (await client.delete(f"{API}/rooms/{room}/messages/1", headers=alice)).status_code == 204
    items = (await history(client, room, carol))["items"]
    assert [(m["seq"], m["deleted"]) for m in items] == [(1, True), (2, False)]


# --- history paging -------------------------------------------------------------------------


async def test_history_pages_backwards_and_forwards(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, _ = chat
    for n in range(1, 8):
        assert (await send(client, room, alice, f"m{n}")).json()["seq"] == n

    newest = await history(client, room, alice, limit=3)
    assert [m["seq"] for m in newest["items"]] == [5, 6, 7]
    assert newest["has_more"] is True
    older = await history(client, room, alice, before_seq=5, limit=3)
    assert ([m["seq"] for m in older["items"]], older["has_more"]) == ([2, 3, 4], True)
    oldest = await history(client, room, alice, before_seq=2, limit=3)
    assert ([m["seq"] for m in oldest["items"]], oldest["has_more"]) == ([1], False)
    assert (await history(client, room, alice, before_seq=1))["items"] == []

    forward = await history(client, room, alice, after_seq=0, limit=4)
    assert ([m["seq"] for m in forward["items"]], forward["has_more"]) == ([1, 2, 3, 4], True)
    rest = await history(client, room, alice, after_seq=4, limit=4)
    assert ([m["seq"] for m in rest["items"]], rest["has_more"]) == ([5, 6, 7], False)
    exact = await history(client, room, alice, after_seq=3, limit=4)
    assert ([m["seq"] for m in exact["items"]], exact["has_more"]) == ([4, 5, 6, 7], False)
    assert (await history(client, room, alice, after_seq=7))["items"] == []
    everything = await history(client, room, alice, limit=200)
    assert ([m["seq"] for m in everything["items"]], everything["has_more"]) == (
        list(range(1, 8)),
        False,
    )


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "ten"},
        {"before_seq": 0},
        {"after_seq": -1},
        {"before_seq": 5, "after_seq": 1},
    ],
    ids=["limit-0", "limit-201", "limit-text", "before-0", "after-negative", "both"],
)
async def test_history_parameter_limits(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers], params: dict[str, Any]
) -> None:
    room, alice, _ = chat
    response = await client.get(f"{API}/rooms/{room}/messages", params=params, headers=alice)
    assert_error(response, 422, "invalid")


async def test_limit_200_is_accepted(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, _ = chat
    page = await history(client, room, alice, limit=200)
    assert page == {"items": [], "has_more": False}


# --- read cursor ----------------------------------------------------------------------------


async def test_read_cursor_moves_forward_only(
    client: httpx.AsyncClient, chat: tuple[str, Headers, Headers]
) -> None:
    room, alice, bob = chat
    for n in range(4):
        await send(client, room, alice, f"m{n}")

    async def my_room() -> dict[str, Any]:
        response = await client.get(f"{API}/rooms/{room}", headers=bob)
        body: dict[str, Any] = response.json()
        return body

    assert ((await my_room())["unread_count"], (await my_room())["last_seq"]) == (4, 4)
    read = await client.post(f"{API}/rooms/{room}/read", json={"seq": 3}, headers=bob)
    assert read.status_code == 204
    assert (await my_room())["unread_count"] == 1
    await client.post(f"{API}/rooms/{room}/read", json={"seq": 1}, headers=bob)
    assert (await my_room())["unread_count"] == 1  # did not move back
    await client.post(f"{API}/rooms/{room}/read", json={"seq": 10**9}, headers=bob)
    members = (await client.get(f"{API}/rooms/{room}/members", headers=bob)).json()["items"]
    assert {m["user"]["username"]: m["last_read_seq"] for m in members}["bob"] == 4
    assert (await my_room())["unread_count"] == 0
    bad = await client.post(f"{API}/rooms/{room}/read", json={"seq": -1}, headers=bob)
    assert_error(bad, 422, "invalid")
    outsider = await make_user(client, "eve")
    response = await client.post(f"{API}/rooms/{room}/read", json={"seq": 1}, headers=outsider)
    assert_error(response, 403, "not_member")


# --- seq allocation under concurrency -------------------------------------------------------


async def test_concurrent_changes_take_seqs_1_to_n_and_a_poller_sees_each_once(
    app_factory: AppFactory,
) -> None:
    """Hundreds of concurrent sends, edits and deletes over separate connections, while a
    reader polls after_seq: seqs are exactly 1..N, and the reader never sees a change twice,
    never out of order, and ends with exactly the stored state."""
    app = await app_factory(message_rate_per_s=100_000, message_burst=100_000)
    writers = [client_for(app, f"10.0.0.{n}") for n in range(8)]
    reader_client = client_for(app, "10.0.1.1")
    async with reader_client:
        heads = [await make_user(writers[n], f"writer{n}") for n in range(len(writers))]
        room = await make_room(writers[0], heads[0])
        for client, head in zip(writers[1:], heads[1:], strict=True):
            await client.post(f"{API}/rooms/{room}/join", headers=head)
        reader = await make_user(reader_client, "reader")
        await reader_client.post(f"{API}/rooms/{room}/join", headers=reader)

        op_seqs: list[int] = []  # the seq each successful change took, as its caller saw it
        mine: dict[int, list[int]] = {n: [] for n in range(len(writers))}
        done = asyncio.Event()

        async def writer(n: int) -> None:
            client, head, rng = writers[n], heads[n], random.Random(n)
            for i in range(40):
                action = rng.random()
                if mine[n] and action < 0.25:
                    seq = rng.choice(mine[n])
                    response = await client.patch(
                        f"{API}/rooms/{room}/messages/{seq}", json={"body": f"e{i}"}, headers=head
                    )
                    if response.status_code == 200:
                        op_seqs.append(response.json()["change_seq"])
                    else:
                        assert_error(response, 409, "message_deleted")
                elif mine[n] and action < 0.35:
                    seq = rng.choice(mine[n])
                    response = await client.delete(
                        f"{API}/rooms/{room}/messages/{seq}", headers=head
                    )
                    assert response.status_code == 204
                else:
                    response = await send(client, room, head, f"w{n}-{i}", client_id=f"{n}-{i}")
                    assert response.status_code == 201, response.text
                    mine[n].append(response.json()["seq"])
                    op_seqs.append(response.json()["seq"])

        seen: dict[str, dict[str, Any]] = {}
        change_seqs_seen: list[int] = []

        async def poll() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                page = await history(reader_client, room, reader, after_seq=cursor, limit=50)
                for message in page["items"]:
                    assert message["change_seq"] > cursor, "a change came back out of order"
                    cursor = message["change_seq"]
                    change_seqs_seen.append(cursor)
                    seen[message["id"]] = message
                if finished and not page["has_more"]:
                    return
                if not page["items"]:
                    await asyncio.sleep(0.005)

        async def run_writers() -> None:
            await asyncio.gather(*(writer(n) for n in range(len(writers))))
            done.set()

        await asyncio.gather(run_writers(), poll())

        final = []
        cursor = 0
        while True:
            page = await history(reader_client, room, reader, after_seq=cursor, limit=200)
            final.extend(page["items"])
            if not page["has_more"]:
                break
            cursor = page["items"][-1]["change_seq"]
        last_seq = (await reader_client.get(f"{API}/rooms/{room}", headers=reader)).json()[
            "last_seq"
        ]
    for client in writers:
        await client.aclose()

    # Deletes answer 204 without a body: their seqs are the tombstones' change_seqs.
    tombstone_seqs = [m["change_seq"] for m in final if m["deleted"]]
    all_seqs = sorted(op_seqs + tombstone_seqs)
    assert all_seqs == list(range(1, last_seq + 1)), "seqs are not exactly 1..N"
    assert last_seq >= 250
    assert len(change_seqs_seen) == len(set(change_seqs_seen)), "a change was seen twice"
    assert seen == {m["id"]: m for m in final}, "the poller's view differs from the store"
    assert sorted(m["seq"] for m in final) == sorted(seq for n in mine for seq in mine[n])


async def test_rest_sends_share_the_message_rate_limit(app_factory: AppFactory) -> None:
    app = await app_factory(message_rate_per_s=2, message_burst=3)
    async with client_for(app) as client:
        alice = await make_user(client, "alice")
        room = await make_room(client, alice)
        statuses = [(await send(client, room, alice, f"m{n}")).status_code for n in range(3)]
        assert statuses == [201, 201, 201]
        refused = await send(client, room, alice, "one too many")
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert (await history(client, room, alice))["items"][-1]["body"] == "m2"


@pytest.mark.parametrize("counters", ["memory://", REDIS_URL])
async def test_concurrent_sends_are_group_committed_each_with_its_own_answer(
    app_factory: AppFactory, counters: str
) -> None:
    """Sends that arrive together share transactions (domain/group_commit.py), yet each gets
    the answer it would get alone, and every room's seqs stay 1..n in announcement order.
    With shared counters, different users' sends are counted at once, each user's in order."""
    app = await app_factory(
        message_rate_per_s=100,
        message_burst=30,
        rate_limit_storage_url=counters,
        signup_ip_limit="1000/second",  # counters on Redis outlive the test: a key of its own
    )
    service = app.state.messages
    limiter = app.state.limiter
    counting = 0
    most_at_once = 0
    allow = limiter.allow

    async def allow_counted(rule: Any, key: str) -> bool:
        nonlocal counting, most_at_once
        counting += 1
        most_at_once = max(most_at_once, counting)
        try:
            return await allow(rule, key)
        finally:
            counting -= 1

    limiter.allow = allow_counted
    seen: list[Event] = []
    app.state.events.subscribe(seen.append)
    commits: list[int] = []
    sa.event.listen(app.state.engine.sync_engine, "commit", lambda _conn: commits.append(1))
    async with client_for(app) as client:
        bodies = [await signup(client, f"gc{n}") for n in range(4)]
        u = [body["user"]["id"] for body in bodies]
        h = [bearer(body["access_token"]) for body in bodies]
        lobby = await make_room(client, h[0], name="lobby")
        side = await make_room(client, h[0], name="side")
        private = await make_room(client, h[0], name="private", visibility="private")
        for n in (1, 2):
            assert (await client.post(f"{API}/rooms/{lobby}/join", headers=h[n])).is_success
        assert (await client.post(f"{API}/rooms/{side}/join", headers=h[1])).is_success
        earlier = await send(client, lobby, h[1], "sent before", client_id="before")
        assert earlier.status_code == 201
    commits.clear()

    sends = [(u[0], lobby, f"owner {n}", f"o{n}") for n in range(32)]  # 2 over the burst
    sends += [(u[n], lobby, f"member {n}.{k}", f"m{n}.{k}") for n in (1, 2) for k in range(10)]
    sends += [(u[1], side, f"side {k}", None) for k in range(8)]
    sends += [
        (u[2], lobby, "twice in one batch", "twice"),
        (u[2], lobby, "twice in one batch", "twice"),
        (u[1], lobby, "a resend", "before"),
        (u[1], side, "reused elsewhere", "before"),
        (u[3], side, "not a member", None),
        (u[3], private, "not visible", None),
    ]
    outcomes = await asyncio.gather(
        *(service.send(user, room, body, cid) for user, room, body, cid in sends),
        return_exceptions=True,
    )
    answers = dict(zip([s[3] or s[2] for s in sends[-6:]], outcomes[-6:], strict=True))

    refused = {n: o for n, o in enumerate(outcomes[:32]) if isinstance(o, Exception)}
    assert list(refused) == [30, 31], refused  # counted in the order sent
    assert [getattr(o, "code", o) for o in refused.values()] == ["rate_limited"] * 2, refused
    if counters == "memory://":
        assert most_at_once == 1, most_at_once
    else:
        assert most_at_once > 1, most_at_once  # up to one per user (4 here)
    first, second = outcomes[-6], outcomes[-5]
    assert (first.created, second.created) == (True, False), (first, second)
    assert first.message == second.message
    assert (outcomes[-4].created, outcomes[-4].message.body) == (False, "sent before")
    assert getattr(outcomes[-3], "code", None) == "client_id_reused", answers
    assert getattr(outcomes[-2], "code", None) == "not_member", answers
    assert getattr(outcomes[-1], "code", None) == "room_not_found", answers

    created = [o for o in outcomes if not isinstance(o, Exception) and o.created]
    assert len(created) == 30 + 20 + 8 + 1
    assert len(commits) <= len(sends) // 4, f"{len(commits)} commits for {len(sends)} sends"
    async with client_for(app) as client:
        for room, expected in ((lobby, 1 + 30 + 20 + 1), (side, 8)):
            items = (await history(client, room, h[1], after_seq=0, limit=200))["items"]
            assert [m["seq"] for m in items] == list(range(1, expected + 1)), room
    for room in (lobby, side):  # announced once each, in seq order
        announced = [e.data["message"]["seq"] for e in seen if e.room_id == room]
        assert announced == list(range(1, len(announced) + 1)), announced
    assert len([e for e in seen if e.type == "message.new"]) == 1 + len(created)


async def test_the_same_client_id_from_two_processes_is_stored_once(
    app_factory: AppFactory,
) -> None:
    """Two services on one database (as two workers): their batches race on the unique
    (author, client_id); the loser answers with the winner's message, and the rest of its
    batch is stored all the same."""
    apps = [await app_factory(), await app_factory()]
    async with client_for(apps[0]) as client:
        body = await signup(client, "racer")
        user, headers = body["user"]["id"], bearer(body["access_token"])
        room = await make_room(client, headers)
    for attempt in range(5):
        cid = f"race-{attempt}"
        outcomes = await asyncio.gather(
            *(
                app.state.messages.send(user, room, f"{cid} via {n}", client_id)
                for n, app in enumerate(apps)
                for client_id in (cid, f"{cid}-own-{n}")
            )
        )
        raced = [o for o in outcomes if o.message.client_id == cid]
        assert sorted(o.created for o in raced) == [False, True], raced
        assert raced[0].message == raced[1].message
        assert all(o.created for o in outcomes if o.message.client_id != cid)
    async with client_for(apps[1]) as client:
        items = (await history(client, room, headers, after_seq=0, limit=200))["items"]
    assert [m["seq"] for m in items] == list(range(1, 16))
    assert len({m["client_id"] for m in items}) == 15
