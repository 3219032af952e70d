"""The per-process hub: which local connections are in which room, presence, and fan-out.

Each event is encoded once and offered to every target connection's queue; nothing here ever
awaits a socket. Message events are delivered per room in seq order: one that arrives ahead
of a missing seq waits briefly for it (publishes of concurrent commits can overtake each
other), then goes out anyway so that a lost event cannot stall a room.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chat_service.domain.events import Event
from chat_service.metrics import Metrics, detached
from chat_service.realtime.connection import Connection, Flusher, Outbound
from chat_service.realtime.frames import encode
from chat_service.schemas import UserSummary

log = logging.getLogger(__name__)

REORDER_WAIT_S = 0.2
MESSAGE_EVENTS = frozenset({"message.new", "message.updated", "message.deleted"})


@dataclass
class RoomState:
    connections: set[Connection] = field(default_factory=set)
    # user id -> how many of that user's connections are subscribed (presence is per user).
    users: dict[str, int] = field(default_factory=dict)
    next_seq: int | None = None
    held: dict[int, Outbound] = field(default_factory=dict)
    release_timer: asyncio.TimerHandle | None = None
    # Each joined connection's `joined.last_seq`, and the highest of them: an event at or
    # below it may already be in a connection's history.
    synced: dict[Connection, int] = field(default_factory=dict)
    synced_max: int = -1


class Hub:
    def __init__(self) -> None:
        self.on_room_idle: Callable[[str], None] = lambda _room_id: None
        self.metrics: Metrics = detached()  # the app sets its own
        # A user's first subscription to a room here, or their last one ending: (room id,
        # user, "online" | "offline"). Presence (realtime/presence.py) decides what others see.
        self.on_presence: Callable[[str, UserSummary, str], None] = lambda *_change: None
        self._rooms: dict[str, RoomState] = {}
        self._flusher = Flusher()
        self._by_user: dict[str, set[Connection]] = defaultdict(set)
        self._by_session: dict[str, set[Connection]] = defaultdict(set)
        self.idle = asyncio.Event()  # set while no connection is registered
        self.idle.set()

    # --- connections and subscriptions -----------------------------------------------------

    def register(self, connection: Connection) -> None:
        self.idle.clear()
        connection.flusher = self._flusher
        self._by_user[connection.user_id].add(connection)
        self._by_session[connection.session_id].add(connection)

    def unregister(self, connection: Connection) -> None:
        for room_id in list(connection.rooms):
            self.unsubscribe(connection, room_id)
        _discard(self._by_user, connection.user_id, connection)
        _discard(self._by_session, connection.session_id, connection)
        if not self._by_user:
            self.idle.set()

    def move_session(self, connection: Connection, session_id: str) -> None:
        _discard(self._by_session, connection.session_id, connection)
        connection.session_id = session_id
        self._by_session[session_id].add(connection)

    def connections_of(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, ()))

    def subscribe(self, connection: Connection, room_id: str) -> None:
        room = self._rooms.setdefault(room_id, RoomState())
        if connection in room.connections:
            return
        room.connections.add(connection)
        connection.rooms.add(room_id)
        first = room.users.get(connection.user_id, 0) == 0
        room.users[connection.user_id] = room.users.get(connection.user_id, 0) + 1
        if first:
            self.on_presence(room_id, connection.user, "online")

    def unsubscribe(self, connection: Connection, room_id: str) -> None:
        room = self._rooms.get(room_id)
        connection.rooms.discard(room_id)
        connection.joining.pop(room_id, None)
        if room is None or connection not in room.connections:
            return
        room.connections.discard(connection)
        room.synced.pop(connection, None)
        remaining = room.users[connection.user_id] - 1
        if remaining:
            room.users[connection.user_id] = remaining
        else:
            del room.users[connection.user_id]
            self.on_presence(room_id, connection.user, "offline")
        if not room.connections:
            if room.release_timer is not None:
                room.release_timer.cancel()
            del self._rooms[room_id]
            self.on_room_idle(room_id)

    def online(self, room_id: str) -> list[UserSummary]:
        room = self._rooms.get(room_id)
        if room is None:
            return []
        users = {c.user_id: c.user for c in room.connections}
        return [users[user_id] for user_id in sorted(room.users)]

    def presences(self) -> Iterator[tuple[str, UserSummary]]:
        """Every (room id, user) this process holds a subscription for."""
        for room_id, room in list(self._rooms.items()):
            users = {c.user_id: c.user for c in room.connections}
            for user_id in list(room.users):
                yield room_id, users[user_id]

    def has_subscribers(self, room_id: str) -> bool:
        return room_id in self._rooms

    def is_online(self, room_id: str, user_id: str) -> bool:
        room = self._rooms.get(room_id)
        return room is not None and user_id in room.users

    def finish_join(self, connection: Connection, room_id: str, last_seq: int) -> None:
        """After `joined` is queued: release the live events that came in meanwhile,
        dropping those the history already held. The first join also tells the room's
        sequencer where the room stands, so it can order the events that follow."""
        room = self._rooms.get(room_id)
        if room is not None:
            if room.next_seq is None:
                room.next_seq = last_seq + 1
                for seq in sorted(s for s in room.held if s <= last_seq):
                    self._deliver(room, room_id, room.held.pop(seq), seq)
                self._release_consecutive(room, room_id)
            # A change committed before the history was read may still be on its way here
            # (published after the read): its event must not repeat it.
            room.synced[connection] = last_seq
            room.synced_max = max(room.synced_max, last_seq)
        for change_seq, frame in connection.joining.pop(room_id, []):
            if change_seq is None or change_seq > last_seq:
                connection.offer(frame)

    def all_connections(self) -> set[Connection]:
        return {c for connections in self._by_user.values() for c in connections}

    def stats(self) -> dict[str, int]:
        return {
            "connections": sum(len(c) for c in self._by_user.values()),
            "users": len(self._by_user),
            "sessions": len(self._by_session),
            "rooms": len(self._rooms),
            "subscriptions": sum(len(r.connections) for r in self._rooms.values()),
        }

    # --- delivery ----------------------------------------------------------------------------

    def broadcast(
        self,
        room_id: str,
        frame: dict[str, Any],
        *,
        droppable: bool = False,
        skip_user: str | None = None,
        change_seq: int | None = None,
    ) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        self._deliver(room, room_id, Outbound(encode(frame), droppable), change_seq, skip_user)

    def _deliver(
        self,
        room: RoomState,
        room_id: str,
        outbound: Outbound,
        change_seq: int | None,
        skip_user: str | None = None,
    ) -> None:
        # Once per frame and member: the hottest loop of a fan-out.
        # Rare: an event that some connection's history may already hold (see finish_join).
        seen = -1 if change_seq is None or change_seq > room.synced_max else change_seq
        for connection in list(room.connections):
            if skip_user is not None and connection.user.id == skip_user:
                continue
            pending = connection.joining.get(room_id) if connection.joining else None
            if pending is not None:
                pending.append((change_seq, outbound))
            elif seen >= 0 and seen <= room.synced.get(connection, -1):
                continue  # in the history it joined with
            else:
                connection.offer(outbound)

    def dispatch(self, event: Event) -> None:
        """Deliver an event from the broker to the local connections it concerns."""
        if event.type in MESSAGE_EVENTS:
            self._message_event(event)
        elif event.type in ("presence", "typing") and event.room_id:
            frame = {"type": event.type, "room_id": event.room_id, **event.data}
            skip = event.user_id if event.type == "typing" else None
            self.broadcast(event.room_id, frame, droppable=True, skip_user=skip)
        elif event.type == "room.updated" and event.room_id:
            room = event.data["room"]
            self.broadcast(
                event.room_id, {"type": "room.updated", "room_id": event.room_id, "room": room}
            )
        elif event.type == "room.deleted" and event.room_id:
            self._end_room(event.room_id, {"type": "room.deleted", "room_id": event.room_id})
        elif event.type == "room.removed" and event.room_id and event.user_id:
            frame = {"type": "room.removed", "room_id": event.room_id, **event.data}
            self._end_room(event.room_id, frame, only_user=event.user_id)
        elif event.type == "session.revoked" and event.session_id:
            for connection in list(self._by_session.get(event.session_id, ())):
                connection.close(4401, "session revoked")

    def _message_event(self, event: Event) -> None:
        assert event.room_id is not None
        room = self._rooms.get(event.room_id)
        if room is None:
            return
        message = event.data["message"]
        self.metrics.observe_fanout(event.type, message)
        seq = int(message["change_seq"])
        outbound = Outbound(
            encode({"type": event.type, "room_id": event.room_id, "message": message})
        )
        if room.next_seq is not None and seq < room.next_seq:
            # A late one, released without it after its wait: deliver as is.
            self._deliver(room, event.room_id, outbound, seq)
        elif seq == room.next_seq:
            self._deliver(room, event.room_id, outbound, seq)
            room.next_seq = seq + 1
            self._release_consecutive(room, event.room_id)
        else:  # ahead of a missing seq, or before the first join told where the room stands
            room.held[seq] = outbound
            if room.release_timer is None:
                room.release_timer = asyncio.get_running_loop().call_later(
                    REORDER_WAIT_S, self._release_held, event.room_id
                )

    def _release_consecutive(self, room: RoomState, room_id: str) -> None:
        while room.next_seq in room.held:
            seq = room.next_seq
            self._deliver(room, room_id, room.held.pop(seq), seq)
            room.next_seq = seq + 1
        if not room.held and room.release_timer is not None:
            room.release_timer.cancel()
            room.release_timer = None

    def _release_held(self, room_id: str) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        room.release_timer = None
        if room.held:
            log.warning(
                "seq gap in live delivery; releasing later changes",
                extra={"room_id": room_id, "expected": room.next_seq, "held": sorted(room.held)},
            )
        for seq in sorted(room.held):
            self._deliver(room, room_id, room.held.pop(seq), seq)
            room.next_seq = seq + 1

    def _end_room(self, room_id: str, frame: dict[str, Any], only_user: str | None = None) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        outbound = Outbound(encode(frame))
        for connection in list(room.connections):
            if only_user is None or connection.user_id == only_user:
                connection.offer(outbound)
                self.unsubscribe(connection, room_id)


def _discard(index: dict[str, set[Connection]], key: str, connection: Connection) -> None:
    connections = index.get(key)
    if connections is not None:
        connections.discard(connection)
        if not connections:
            del index[key]
