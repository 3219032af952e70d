"""Domain events: what changed, published after the change is committed.

The domain publishes through `EventSink`; whoever delivers events (the WebSocket gateway's
hub, a broker for several processes) subscribes to an `EventBus` without the domain knowing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

EventType = Literal[
    "message.new",
    "message.updated",
    "message.deleted",
    "room.updated",
    "room.deleted",
    "room.removed",
    "session.revoked",
    "presence",
    "typing",
]


@dataclass(frozen=True)
class Event:
    """`data` is the payload clients receive, plain values for orjson (datetimes included);
    the ids say who it concerns."""

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    room_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None


class EventSink(Protocol):
    def publish(self, event: Event) -> None: ...


Subscriber = Callable[[Event], None]


class EventBus:
    """In-process publish/subscribe. Subscribers must not block: they queue and return."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # one broken subscriber must not stop delivery to the others
                log.exception("event subscriber failed", extra={"event": event.type})
