"""Presence and per-user connection counts: in this process, or across processes via Redis.

The hub knows which users this process holds in which rooms. `LocalPresence` answers from
that alone (one process). `ClusterPresence` also records it in Redis, so that the online
list, `presence` events and the connection cap cover every worker and host:

- each process has a liveness key that it renews every third of PRESENCE_TTL_S; a process
  that dies stops renewing, and the first live process to notice sweeps its entries away and
  publishes `offline` for the users that were only there;
- a user goes `online` in a room when the first process records them there and `offline` when
  the last one lets go (Lua scripts make each check-and-change atomic);
- while Redis is unreachable each process answers from what it holds itself (presence and the
  connection cap are per process), and when Redis is back (or was restarted empty) it
  records everything it holds again.

Not for Redis Cluster: the scripts touch keys they compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chat_service.domain.events import Event, EventSink
from chat_service.realtime.hub import Hub
from chat_service.schemas import UserSummary

log = logging.getLogger(__name__)

PREFIX = "chat:presence:"
OPERATION_TIMEOUT_S = 2.0
FAILURES = (RedisError, OSError, TimeoutError)
SEPARATOR = "\x1f"  # between room and user ids in a process's index of its entries


def presence_event(room_id: str, user: UserSummary, status: str) -> Event:
    data = {"user": user.model_dump(), "status": status}
    return Event("presence", data, room_id=room_id, user_id=user.id)


class LocalPresence:
    """One process: the hub holds everything there is to know."""

    def __init__(self, hub: Hub, events: EventSink) -> None:
        self._hub = hub
        self._events = events

    async def start(self) -> None:
        self._hub.on_presence = self.changed

    async def stop(self) -> None:
        return None

    def changed(self, room_id: str, user: UserSummary, status: str) -> None:
        """Hub callback: `user` came into `room_id` here, or left it, on its first/last socket."""
        self._events.publish(presence_event(room_id, user, status))

    async def claim_connection(self, user_id: str, limit: int) -> bool:
        """May `user_id` open one more socket? The caller registers it before its next await."""
        return self._hub.connections_of(user_id) < limit

    def release_connection(self, user_id: str) -> None:
        return None  # the hub's count dropped when the connection unregistered

    async def online(self, room_id: str) -> list[UserSummary]:
        return self._hub.online(room_id)

    async def online_ids(self, room_id: str) -> set[str]:
        return {user.id for user in self._hub.online(room_id)}


class ClusterPresence(LocalPresence):
    """Many processes: the truth lives in Redis; this process's share is replayed into it
    whenever Redis has lost it."""

    def __init__(self, hub: Hub, events: EventSink, url: str, ttl_s: float) -> None:
        super().__init__(hub, events)
        self.process_id = secrets.token_hex(8)
        self._ttl_ms = int(ttl_s * 1000)
        self._renew_every_s = ttl_s / 3
        self._redis = aioredis.from_url(
            url,
            socket_connect_timeout=OPERATION_TIMEOUT_S,
            socket_timeout=OPERATION_TIMEOUT_S,
        )
        self._scripts = {name: self._redis.register_script(code) for name, code in SCRIPTS.items()}
        self._claimed: Counter[str] = Counter()
        self._reachable = False
        self._replay_queued = False
        # Changes go to Redis one at a time, in the order they happened here.
        self._changes: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await super().start()
        self._tasks = [
            asyncio.create_task(self._apply_changes_forever(), name="presence-changes"),
            asyncio.create_task(self._renew_forever(), name="presence-renewal"),
        ]

    async def stop(self) -> None:
        """Flush what is queued and take this process's entries out, within the timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changes.join(), OPERATION_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reachable:
            with contextlib.suppress(*FAILURES):
                await self._sweep(self.process_id)
        await self._redis.aclose()

    # --- what the hub and the gateway call -----------------------------------------------------

    def changed(self, room_id: str, user: UserSummary, status: str) -> None:
        if status == "online":
            self._changes.put_nowait(lambda: self._enter(room_id, user))
        else:
            self._changes.put_nowait(lambda: self._leave(room_id, user))

    async def claim_connection(self, user_id: str, limit: int) -> bool:
        if self._reachable:
            try:
                claimed = await self._script("claim", user_id, self.process_id, limit)
            except FAILURES as exc:
                self._lost(exc)
            else:
                if claimed:
                    self._claimed[user_id] += 1
                return bool(claimed)
        if not await super().claim_connection(user_id, limit):
            return False
        self._claimed[user_id] += 1
        return True

    def release_connection(self, user_id: str) -> None:
        self._claimed[user_id] -= 1
        if self._claimed[user_id] <= 0:
            del self._claimed[user_id]
        self._changes.put_nowait(lambda: self._release(user_id))

    async def online(self, room_id: str) -> list[UserSummary]:
        here = {user.id: user for user in self._hub.online(room_id)}
        if self._reachable:
            try:
                summaries = await self._script("online", room_id)
            except FAILURES as exc:
                self._lost(exc)
            else:
                for raw in summaries:
                    user = UserSummary.model_validate_json(raw)
                    here.setdefault(user.id, user)
        return [here[user_id] for user_id in sorted(here)]

    async def online_ids(self, room_id: str) -> set[str]:
        return {user.id for user in await self.online(room_id)}

    # --- changes, applied in order ----------------------------------------------------------

    async def _apply_changes_forever(self) -> None:
        while True:
            change = await self._changes.get()
            try:
                await change()
            except Exception:  # one failed change must not stop the others
                log.exception("presence change failed")
            finally:
                self._changes.task_done()

    async def _enter(self, room_id: str, user: UserSummary) -> None:
        first = True  # without Redis, this process's view decides
        if self._reachable:
            try:
                first = bool(
                    await self._script(
                        "enter", room_id, user.id, self.process_id, user.model_dump_json()
                    )
                )
            except FAILURES as exc:
                self._lost(exc)
        if first:
            super().changed(room_id, user, "online")

    async def _leave(self, room_id: str, user: UserSummary) -> None:
        last = True
        if self._reachable:
            try:
                last = bool(await self._script("leave", room_id, user.id, self.process_id))
            except FAILURES as exc:
                self._lost(exc)
        if last:
            super().changed(room_id, user, "offline")

    async def _release(self, user_id: str) -> None:
        if self._reachable:
            try:
                await self._script("release", user_id, self.process_id)
            except FAILURES as exc:
                self._lost(exc)

    # --- liveness, sweeping and replay ----------------------------------------------------------

    async def _renew_forever(self) -> None:
        while True:
            try:
                await self._renew()
            except FAILURES as exc:
                self._lost(exc)
            except Exception:  # keep renewing whatever went wrong once
                log.exception("presence renewal failed")
            await asyncio.sleep(self._renew_every_s)

    async def _renew(self) -> None:
        unknown = await self._script("renew", self.process_id, self._ttl_ms)
        if (unknown or not self._reachable) and not self._replay_queued:
            # Redis has never seen us, lost us (restarted empty) or swept us (we were stalled
            # past the TTL), or we could not reach it for a while: make what it holds for us
            # match what we hold.
            self._replay_queued = True
            self._changes.put_nowait(self._replay)
        for process_id in await self._script("dead"):
            await self._sweep(process_id.decode())

    async def _replay(self) -> None:
        self._replay_queued = False
        presences = list(self._hub.presences())
        args: list[Any] = [self.process_id, len(presences)]
        for room_id, user in presences:
            args += [room_id, user.id, user.model_dump_json()]
        for user_id, count in self._claimed.items():
            args += [user_id, count]
        changes = await self._script("replay", *args)
        for status, room_id, raw in zip(changes[::3], changes[1::3], changes[2::3], strict=True):
            user = UserSummary.model_validate_json(raw)
            super().changed(room_id.decode(), user, status.decode())
        if not self._reachable:
            log.info("presence recorded in redis", extra={"process_id": self.process_id})
        self._reachable = True

    async def _sweep(self, process_id: str) -> None:
        """Take a process's entries out; publish `offline` for users it alone held."""
        gone = await self._script("sweep", process_id)
        for room_id, raw in zip(gone[::2], gone[1::2], strict=True):
            user = UserSummary.model_validate_json(raw)
            super().changed(room_id.decode(), user, "offline")
        if process_id != self.process_id:
            log.info(
                "swept a stopped process's presence",
                extra={"process_id": process_id, "offline": len(gone) // 2},
            )

    def _lost(self, exc: BaseException) -> None:
        if self._reachable:
            log.warning(
                "presence store unreachable; answering from this process",
                extra={"error": repr(exc)},
            )
        self._reachable = False

    async def _script(self, name: str, *args: Any) -> Any:
        return await asyncio.wait_for(
            self._scripts[name](keys=[], args=[PREFIX, *args]), OPERATION_TIMEOUT_S
        )


# Keys (PREFIX first): procs (set of known processes), proc:<id> (liveness, with TTL),
# proc:<id>:entries (set of "room<US>user" this process holds), proc:<id>:users (users with
# sockets here), room:<room> (hash user -> summary JSON of everyone online there),
# room:<room>:user:<user> (set of processes holding that user there), conns:<user> (hash
# process -> sockets open there).
_ALIVE = """
local function alive(p, id) return redis.call('EXISTS', p .. 'proc:' .. id) == 1 end
local function held_elsewhere(p, room, user, me)
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'room:' .. room .. ':user:' .. user)) do
    if id ~= me and alive(p, id) then return true end
  end
  return false
end
"""

SCRIPTS = {
    # ARGV: prefix, room, user, process, summary -> 1 if the user was online nowhere else
    "enter": _ALIVE
    + """
local p, room, user, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('SADD', p .. 'room:' .. room .. ':user:' .. user, me)
redis.call('SADD', p .. 'proc:' .. me .. ':entries', room .. '\\31' .. user)
redis.call('HSET', p .. 'room:' .. room, user, ARGV[5])
if held_elsewhere(p, room, user, me) then return 0 end
return 1
""",
    # ARGV: prefix, room, user, process -> 1 if no live process holds the user there any more
    "leave": _ALIVE
    + """
local p, room, user, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('SREM', p .. 'room:' .. room .. ':user:' .. user, me)
redis.call('SREM', p .. 'proc:' .. me .. ':entries', room .. '\\31' .. user)
if held_elsewhere(p, room, user, me) then return 0 end
redis.call('HDEL', p .. 'room:' .. room, user)
return 1
""",
    # ARGV: prefix, room -> summaries of users held by a live process
    "online": _ALIVE
    + """
local p, room = ARGV[1], ARGV[2]
local summaries = {}
local entries = redis.call('HGETALL', p .. 'room:' .. room)
for i = 1, #entries, 2 do
  if held_elsewhere(p, room, entries[i], '') then table.insert(summaries, entries[i + 1]) end
end
return summaries
""",
    # ARGV: prefix, user, process, limit -> 1 and counted, or 0 at the limit
    "claim": _ALIVE
    + """
local p, user, me, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. 'conns:' .. user
local counts = redis.call('HGETALL', key)
local total = 0
for i = 1, #counts, 2 do
  if counts[i] == me or alive(p, counts[i]) then total = total + tonumber(counts[i + 1]) end
end
if total >= limit then return 0 end
redis.call('HINCRBY', key, me, 1)
redis.call('SADD', p .. 'proc:' .. me .. ':users', user)
return 1
""",
    # ARGV: prefix, user, process
    "release": """
local p, user, me = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'conns:' .. user
if redis.call('HINCRBY', key, me, -1) <= 0 then
  redis.call('HDEL', key, me)
  redis.call('SREM', p .. 'proc:' .. me .. ':users', user)
end
return 1
""",
    # ARGV: prefix, process, n, then n times (room, user, summary), then (user, sockets) pairs:
    # everything this process holds. Entries Redis lacks are added, entries it has beyond
    # these are removed -> status1, room1, summary1, ...: the presence changes that makes.
    "replay": _ALIVE
    + """
local p, me, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries = p .. 'proc:' .. me .. ':entries'
local wanted, changes, i = {}, {}, 4
for _ = 1, n do
  local room, user, summary = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  wanted[room .. '\31' .. user] = true
  local holders = p .. 'room:' .. room .. ':user:' .. user
  local known = redis.call('SISMEMBER', holders, me) == 1
  redis.call('SADD', holders, me)
  redis.call('SADD', entries, room .. '\31' .. user)
  redis.call('HSET', p .. 'room:' .. room, user, summary)
  if not known and not held_elsewhere(p, room, user, me) then
    table.insert(changes, 'online'); table.insert(changes, room); table.insert(changes, summary)
  end
end
for _, entry in ipairs(redis.call('SMEMBERS', entries)) do
  if not wanted[entry] then
    local cut = string.find(entry, '\31', 1, true)
    local room, user = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
    redis.call('SREM', p .. 'room:' .. room .. ':user:' .. user, me)
    redis.call('SREM', entries, entry)
    local summary = redis.call('HGET', p .. 'room:' .. room, user)
    if summary and not held_elsewhere(p, room, user, me) then
      redis.call('HDEL', p .. 'room:' .. room, user)
      table.insert(changes, 'offline'); table.insert(changes, room); table.insert(changes, summary)
    end
  end
end
local users = p .. 'proc:' .. me .. ':users'
for _, user in ipairs(redis.call('SMEMBERS', users)) do
  redis.call('HDEL', p .. 'conns:' .. user, me)
end
redis.call('DEL', users)
for j = i, #ARGV, 2 do
  redis.call('HSET', p .. 'conns:' .. ARGV[j], me, ARGV[j + 1])
  redis.call('SADD', users, ARGV[j])
end
return changes
""",
    # ARGV: prefix, process, ttl ms -> 1 if Redis did not know this process
    "renew": """
local p, me = ARGV[1], ARGV[2]
redis.call('SET', p .. 'proc:' .. me, '1', 'PX', ARGV[3])
return redis.call('SADD', p .. 'procs', me)
""",
    # ARGV: prefix -> processes whose liveness key has expired
    "dead": _ALIVE
    + """
local p = ARGV[1]
local dead = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'procs')) do
  if not alive(p, id) then table.insert(dead, id) end
end
return dead
""",
    # ARGV: prefix, process -> room1, summary1, ...: users now online nowhere. Only the first
    # sweeper of a process gets anything back.
    "sweep": _ALIVE
    + """
local p, gone = ARGV[1], ARGV[2]
local offline = {}
if redis.call('SREM', p .. 'procs', gone) == 0 then return offline end
redis.call('DEL', p .. 'proc:' .. gone)
local entries = p .. 'proc:' .. gone .. ':entries'
for _, entry in ipairs(redis.call('SMEMBERS', entries)) do
  local cut = string.find(entry, '\\31', 1, true)
  local room, user = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
  redis.call('SREM', p .. 'room:' .. room .. ':user:' .. user, gone)
  if not held_elsewhere(p, room, user, gone) then
    local summary = redis.call('HGET', p .. 'room:' .. room, user)
    if summary then
      redis.call('HDEL', p .. 'room:' .. room, user)
      table.insert(offline, room)
      table.insert(offline, summary)
    end
  end
end
redis.call('DEL', entries)
local users = p .. 'proc:' .. gone .. ':users'
for _, user in ipairs(redis.call('SMEMBERS', users)) do
  redis.call('HDEL', p .. 'conns:' .. user, gone)
end
redis.call('DEL', users)
return offline
""",
}
