""" "Acked means persisted" (issue 8, item 5), under crashes of the database and the server.

Several WebSocket senders send ACK_DURABILITY_MESSAGES messages in all (distinct client_ids,
default 2000), a few in flight each, to two `chat-service serve` processes on a private
PostgreSQL cluster (tests/pg_private.py), recording every ack. At random moments (by progress,
not by the clock, so a slow machine sees the same faults) Postgres is stopped with an
immediate shutdown (a crash, for the data: recovery runs at the next start), a server is
killed with SIGKILL, or both; each is started again. Senders reconnect (to whichever server is
up) and go on, resending every unacknowledged message with its client_id, which must never
store it twice. At the end, from Postgres itself:

- every acknowledged client_id is stored exactly once, with the seq and body its ack gave;
- every client_id was acked in the end (so nothing else is stored either);
- the seqs of each room are exactly 1..N.

Environment:
- ACK_DURABILITY_MESSAGES: how many messages (default 2000; try 20000 locally);
- ACK_DURABILITY_FAULTS: how many faults (default 4);
- ACK_DURABILITY_SEED: replay a run; the seed of every run is logged and is in every
  failure message.

`internal` error replies are retried like `unavailable` here (a client that cannot know
better does that, and client_ids make it safe); test_faults.py holds the service to the
contract's error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.helpers import API, ServerProcess, free_port
from tests.pg_private import (
    PrivatePostgres,
    pg_database_fixture,  # noqa: F401  (registers the `pg_database` fixture)
    private_postgres_fixture,  # noqa: F401  (registers the `private_postgres` fixture)
)
from tests.test_faults import (
    HANG_S,
    START_TIMEOUT_S,
    Chat,
    Closed,
    Refused,
    User,
    new_room,
    new_user,
    send_frame,
    service_env,
    stored_messages,
)

pytestmark = pytest.mark.backend_independent(suite="postgres")  # see tests/conftest.py
log = logging.getLogger(__name__)

MESSAGES = int(os.environ.get("ACK_DURABILITY_MESSAGES", "2000"))
FAULTS = int(os.environ.get("ACK_DURABILITY_FAULTS", "4"))
USERS, LANES_PER_USER, WINDOW = 4, 2, 4  # 8 sockets with up to 4 sends in flight each
ROOMS = 2
# Faults fall between these points of progress; senders never get more than GATE_MARGIN past
# the next one before it has happened, so that a slow restart cannot let the traffic end first.
FIRST_FAULT_AT, LAST_FAULT_AT, GATE_MARGIN = 0.05, 0.85, 0.05
RETRY_S = 0.1
Json = dict[str, Any]


@dataclass
class Tally:
    """What every lane saw, shared."""

    total: int
    acked: dict[tuple[str, str], Json] = field(default_factory=dict)  # (author, client_id)
    replies: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)
    ceiling: float = 1.0  # no send starts past this progress
    gate_moved: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def progress(self) -> float:
        return len(self.acked) / self.total

    async def reached(self, point: float) -> None:
        while self.progress < point:
            self.progressed.clear()
            await self.progressed.wait()

    async def may_send(self) -> None:
        while self.progress >= self.ceiling:
            self.gate_moved.clear()
            await self.gate_moved.wait()

    def move_gate(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.gate_moved.set()


@dataclass
class Lane:
    """One sender socket: its share of client_ids, sent `WINDOW` at a time, until each is
    acked; a lost socket is replaced, on whichever server answers."""

    name: str
    user: User
    room: str
    servers: list[ServerProcess]
    tally: Tally
    queue: deque[str]

    async def run(self) -> None:
        while self.queue:
            chat = await self._connect()
            try:
                await asyncio.gather(*(self._worker(chat) for _ in range(WINDOW)))
            finally:
                await chat.close()

    async def _connect(self) -> Chat:
        backoff = RETRY_S
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.process is None or server.process.poll() is not None:
                    continue
                try:
                    return await Chat.open(server, self.user.token, self.name)
                except Refused as refused:
                    self.tally.replies[f"handshake {refused.code}"] += 1
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError):
                    self.tally.replies["connect failed"] += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        raise AssertionError(f"{self.name}: no server took a connection for 120 s")

    async def _worker(self, chat: Chat) -> None:
        while self.queue:
            await self.tally.may_send()
            client_id = self.queue.popleft()
            frame = send_frame(self.room, f"durable {client_id}", client_id)
            try:
                reply = await chat.request(frame)
            except Closed:
                self.queue.appendleft(client_id)  # resent on the next socket
                return
            if reply["type"] == "ack":
                self._record(client_id, reply["message"])
                continue
            self.tally.replies[str(reply.get("code"))] += 1
            await asyncio.sleep(RETRY_S)
            self.queue.appendleft(client_id)

    def _record(self, client_id: str, message: Json) -> None:
        key = (self.user.id, client_id)
        earlier = self.tally.acked.get(key)
        if earlier is not None and earlier["id"] != message["id"]:
            self.tally.problems.append(f"{client_id} acked twice as {earlier} and {message}")
        self.tally.acked[key] = message
        self.tally.replies["ack"] += 1
        self.tally.progressed.set()


@dataclass
class Chaos:
    """The faults, at seeded random points of progress."""

    rng: random.Random
    cluster: PrivatePostgres
    servers: list[ServerProcess]
    tally: Tally
    done: list[str] = field(default_factory=list)
    restarts: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    async def run(self) -> None:
        points = sorted(self.rng.uniform(FIRST_FAULT_AT, LAST_FAULT_AT) for _ in range(FAULTS))
        kinds = ["postgres", "server", "both"][:FAULTS]  # each kind at least once
        kinds += [self.rng.choice(kinds) for _ in range(FAULTS - len(kinds))]
        self.rng.shuffle(kinds)
        try:
            for n, (point, kind) in enumerate(zip(points, kinds, strict=True)):
                self.tally.move_gate(point + GATE_MARGIN)
                await self.tally.reached(point)
                self.done.append(f"{kind} at {self.tally.progress:.0%}")
                log.info("fault: %s", self.done[-1])
                # Senders go on as soon as the crash has happened: into the outage.
                after = points[n + 1] + GATE_MARGIN if n + 1 < len(points) else 1.0
                await self._fault(kind, functools.partial(self.tally.move_gate, after))
        finally:
            self.tally.move_gate(1.0)

    async def _fault(self, kind: str, crashed: Callable[[], None]) -> None:
        """Crash; call `crashed`; restart Postgres, and a server in the background (its
        restart is waited for by the next server fault, or by the test)."""
        if kind in ("server", "both"):
            victim = await self._victim()
            process = self.servers[victim].process
            assert process is not None
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait)
            self.restarts[victim] = asyncio.create_task(
                asyncio.to_thread(self.servers[victim].start, START_TIMEOUT_S)
            )
        if kind in ("postgres", "both"):
            await asyncio.to_thread(self.cluster.stop, "immediate")
        crashed()
        if kind in ("postgres", "both"):
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await asyncio.to_thread(self.cluster.start)

    async def _victim(self) -> int:
        """A server that is up (the other may still be restarting: then both are down)."""
        up = [n for n in range(len(self.servers)) if n not in self._restarting()]
        if not up:
            await asyncio.wait(self.restarts.values(), return_when=asyncio.FIRST_COMPLETED)
            up = [n for n in range(len(self.servers)) if n not in self._restarting()]
        for n in list(self.restarts):
            if self.restarts[n].done():
                self.restarts.pop(n).result()  # a failed restart fails the test here
        return self.rng.choice(up)

    def _restarting(self) -> set[int]:
        return {n for n, task in self.restarts.items() if not task.done()}


async def test_every_ack_survives_crashes_of_postgres_and_the_server(
    private_postgres: PrivatePostgres, pg_database: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("ACK_DURABILITY_SEED") or secrets.randbits(32))
    log.info("ACK_DURABILITY_SEED=%d, %d messages, %d faults", seed, MESSAGES, FAULTS)
    rng = random.Random(seed)
    env = service_env(pg_database, tmp_path)
    servers = [ServerProcess(env=env, port=free_port(), workdir=tmp_path) for _ in range(2)]
    await asyncio.gather(*(asyncio.to_thread(s.start, START_TIMEOUT_S) for s in servers))
    tally = Tally(MESSAGES)
    chaos = Chaos(rng, private_postgres, servers, tally)
    try:
        lanes = await _lanes(servers, tally)
        started = time.monotonic()
        chaos_task = asyncio.create_task(chaos.run())
        await asyncio.gather(*(lane.run() for lane in lanes))
        await chaos_task
        took = time.monotonic() - started
        await asyncio.gather(*chaos.restarts.values())  # a failed restart fails the test
    finally:
        tally.move_gate(1.0)
        with contextlib.suppress(Exception):  # cleanup after a failure: the failure is told
            await asyncio.gather(*chaos.restarts.values())
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    log.info(
        "%d acks in %.1f s; replies %s; faults %s",
        len(tally.acked),
        took,
        tally.replies,
        chaos.done,
    )
    problems = tally.problems + await _check_stored(pg_database, tally)
    if len(chaos.done) != FAULTS:
        problems.append(f"only {len(chaos.done)} of {FAULTS} faults happened: {chaos.done}")
    context = f"ACK_DURABILITY_SEED={seed}; faults: {chaos.done}; replies: {dict(tally.replies)}"
    assert not problems, context + "\n" + "\n".join(problems[:30])


async def _lanes(servers: list[ServerProcess], tally: Tally) -> list[Lane]:
    async with httpx.AsyncClient(base_url=servers[0].url, timeout=HANG_S) as http:
        users = [await new_user(http, f"durable{n}") for n in range(USERS)]
        rooms = [await new_room(http, users[0], f"durable {n}") for n in range(ROOMS)]
        for n, user in enumerate(users[1:], 1):
            joined = await http.post(f"{API}/rooms/{rooms[n % ROOMS]}/join", headers=user.headers)
            assert joined.status_code == 200, joined.text
    lanes = []
    count = USERS * LANES_PER_USER
    for n in range(count):
        user = users[n % USERS]
        share = MESSAGES // count + (1 if n < MESSAGES % count else 0)
        # Each lane prefers its own server, and falls back on the other.
        order = servers[n % 2 :] + servers[: n % 2]
        client_ids = deque(f"{n}-{k}-{secrets.token_hex(4)}" for k in range(share))
        lanes.append(Lane(f"lane{n}", user, rooms[(n % USERS) % ROOMS], order, tally, client_ids))
    return lanes


async def _check_stored(database_url: str, tally: Tally) -> list[str]:
    rows = await stored_messages(database_url)
    problems = []
    stored: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        stored.setdefault((row["author_id"], row["client_id"]), []).append(row)
    for key, message in tally.acked.items():
        found = stored.get(key, [])
        if len(found) != 1:
            problems.append(f"acked {key} is stored {len(found)} times: {message}")
        elif (found[0]["seq"], found[0]["body"], found[0]["room_id"]) != (
            message["seq"],
            message["body"],
            message["room_id"],
        ):
            problems.append(f"acked {message}, stored {dict(found[0])}")
    if len(tally.acked) != tally.total:
        problems.append(f"{len(tally.acked)} of {tally.total} client_ids were acked")
    extra = set(stored) - set(tally.acked)
    if extra:
        problems.append(f"{len(extra)} stored messages were never acked: {sorted(extra)[:5]}")
    for room in {row["room_id"] for row in rows}:
        seqs = [row["seq"] for row in rows if row["room_id"] == room]
        if seqs != list(range(1, len(seqs) + 1)):
            gaps = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            problems.append(f"room {room}: {len(seqs)} seqs up to {max(seqs)}, gaps {gaps[:20]}")
    return problems
