"""Prometheus metrics: one registry per app, the HTTP middleware, and scrape-time gauges.

Every app owns its `Metrics` (its own CollectorRegistry), made in `create_app` and handed to
the parts that count things; nothing goes to prometheus_client's global registry, so many
apps can live in one process (the tests build dozens). Each process (each uvicorn worker)
exports its own figures: see docs/operations.md, "Metrics with several workers".

Label values come only from fixed sets (route templates, known close codes, error codes),
never from raw paths or client input, so no client can grow the number of series.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_service.domain.events import Event
from chat_service.errors import DomainError, Forbidden, Unauthorized

# The classic text format (every Prometheus version reads it; generate_latest writes it).
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Close codes worth a series of their own; anything else a client sends counts as "other".
CLOSE_CODES = frozenset(
    {1000, 1001, 1005, 1006, 1008, 1009, 1011, 1012, 1013, 4401, 4403, 4404, 4408, 4429}
)
ABNORMAL_CLOSE = 1006  # the peer went without a close frame
TIMED_EVENTS = {"message.new": "created_at", "message.updated": "edited_at"}


Labelled = TypeVar("Labelled", Counter, Histogram)


class ByLabel(Generic[Labelled]):
    """A one-label metric's children, each looked up once: `labels()` costs about a
    microsecond, and these count every frame and every event. (Label values come from
    fixed sets, so the cache is bounded.)"""

    def __init__(self, metric: Labelled) -> None:
        self._metric: Labelled = metric
        self._children: dict[str, Labelled] = {}

    def __call__(self, value: str) -> Labelled:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(value)
        return child


class Metrics:
    """Every metric the service exports, registered in this object's own registry."""

    def __init__(self) -> None:
        # `_created` timestamps double the output for no use here (process-wide switch).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.runtime = RuntimeCollector()
        registry.register(self.runtime)

        self.http_requests = Counter(
            "chat_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "chat_http_request_duration_seconds",
            "HTTP request time from arrival to the last byte of the response.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.ws_opened = Counter(
            "chat_ws_connections_opened",
            "WebSocket connections authenticated and accepted.",
            registry=registry,
        )
        self.ws_closed = Counter(
            "chat_ws_connections_closed",
            "Accepted WebSocket connections that ended, by close code (1006: no close frame).",
            ["code"],
            registry=registry,
        )
        self.ws_refused = Counter(
            "chat_ws_handshake_refusals",
            "WebSocket handshakes refused (accepted only to be closed at once), by close code.",
            ["code"],
            registry=registry,
        )
        self.ws_frames_received = Counter(
            "chat_ws_frames_received",
            "Client frames received that named a known type, by type.",
            ["type"],
            registry=registry,
        )
        self.ws_error_frames = Counter(
            "chat_ws_error_frames",
            "Error frames sent to clients, by error code.",
            ["code"],
            registry=registry,
        )
        self.ws_frames_sent = Counter(
            "chat_ws_frames_sent",
            "Frames written to WebSocket connections (every event, reply and error).",
            registry=registry,
        )
        self.ws_socket_writes = Counter(
            "chat_ws_socket_writes",
            "Socket writes carrying those frames (one write takes every frame queued for a "
            "connection, so fewer writes than frames means bursts were coalesced).",
            registry=registry,
        )
        self.ws_frames_dropped = Counter(
            "chat_ws_frames_dropped",
            "Droppable frames (typing, presence) dropped from full outbound queues.",
            registry=registry,
        )
        self.ws_slow_closes = Counter(
            "chat_ws_slow_consumer_closes",
            "Connections closed 4408 because their outbound queue overflowed.",
            registry=registry,
        )
        self.messages_stored = Counter(
            "chat_messages_stored",
            "New messages committed by this process (WebSocket and REST sends).",
            registry=registry,
        )
        self.events_published = Counter(
            "chat_events_published",
            "Domain events published by this process after their change, by type.",
            ["type"],
            registry=registry,
        )
        self.fanout_latency = Histogram(
            "chat_fanout_latency_seconds",
            "From a message change being stored to its event reaching this process's hub "
            "for delivery to the local connections' queues, by event type.",
            ["event"],
            buckets=FANOUT_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "chat_rate_limited",
            "Actions refused by a rate limit, by limit name.",
            ["limit"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "chat_auth_failures",
            "Refused credentials, by reason (the error code) and transport (http, ws).",
            ["reason", "transport"],
            registry=registry,
        )
        self._frames_received_by_type = ByLabel(self.ws_frames_received)
        self._events_published_by_type = ByLabel(self.events_published)
        self._fanout_latency_by_event = ByLabel(self.fanout_latency)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    # --- hooks, called from the code that sees the event ---------------------------------

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "OTHER"
        labels = (method, route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_duration.labels(*labels).observe(seconds)

    def ws_closed_with(self, code: int | None) -> None:
        self.ws_closed.labels(_close_label(code)).inc()

    def handshake_refused(self, code: int, cause: BaseException | None) -> None:
        """A refused handshake; one refused for its credentials is an auth failure too."""
        self.ws_refused.labels(_close_label(code)).inc()
        if isinstance(cause, Unauthorized | Forbidden):
            self.auth_failed(cause.code, "ws")
        elif code == 4401 and not isinstance(cause, DomainError):
            self.auth_failed("not_authenticated", "ws")  # missing or malformed credentials

    def auth_failed(self, reason: str, transport: str) -> None:
        self.auth_failures.labels(reason, transport).inc()

    def on_event(self, event: Event) -> None:
        """EventBus subscriber: the events this process publishes, after their commit."""
        self._events_published_by_type(event.type).inc()
        if event.type == "message.new":
            self.messages_stored.inc()

    def observe_fanout(self, event_type: str, message: Mapping[str, Any]) -> None:
        """Time since the message change was stored (its timestamp), as the hub delivers it."""
        field = TIMED_EVENTS.get(event_type)
        stamp = message.get(field) if field else None
        if not isinstance(stamp, str):
            return
        try:
            stored = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            return
        self._fanout_latency_by_event(event_type).observe(max(0.0, time.time() - stored))

    def frame_received(self, frame_type: str) -> None:
        """A client frame of a known type (`frame_type` from the protocol's fixed set)."""
        self._frames_received_by_type(frame_type).inc()


def _close_label(code: int | None) -> str:
    code = ABNORMAL_CLOSE if code is None else code
    return str(code) if code in CLOSE_CODES else "other"


class RuntimeCollector:
    """Gauges read at scrape time from the live objects (nothing to keep in step)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hub_stats: Callable[[], Mapping[str, int]] | None = None
        self._broker_healthy: Callable[[], bool] | None = None
        self._pool: Any = None

    def bind(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        hub_stats: Callable[[], Mapping[str, int]],
        broker_healthy: Callable[[], bool],
        pool: Any,
    ) -> None:
        self._loop = loop
        self._hub_stats = hub_stats
        self._broker_healthy = broker_healthy
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        if self._loop is not None:
            yield GaugeMetricFamily(
                "chat_asyncio_tasks",
                "asyncio tasks alive in this process's event loop.",
                value=len(asyncio.all_tasks(self._loop)),
            )
        if self._hub_stats is not None:
            stats = dict(self._hub_stats())
            yield GaugeMetricFamily(
                "chat_ws_connections",
                "WebSocket connections open in this process.",
                value=stats.pop("connections", 0),
            )
            hub = GaugeMetricFamily(
                "chat_hub_entries",
                "Entries in this process's hub, by kind (users, rooms, subscriptions...).",
                labels=["kind"],
            )
            for kind, count in sorted(stats.items()):
                hub.add_metric([kind], count)
            yield hub
        if self._broker_healthy is not None:
            yield GaugeMetricFamily(
                "chat_broker_up",
                "1 while the fan-out broker is reachable, else 0.",
                value=1 if self._broker_healthy() else 0,
            )
        yield from self._pool_gauges()

    def _pool_gauges(self) -> Iterable[Metric]:
        checked_out = getattr(self._pool, "checkedout", None)
        idle = getattr(self._pool, "checkedin", None)
        if not (callable(checked_out) and callable(idle)):
            return  # a pool without counters (SQLite's): nothing to say
        pool = GaugeMetricFamily(
            "chat_db_pool_connections",
            "Database connections held by this process's pool, by state.",
            labels=["state"],
        )
        pool.add_metric(["in_use"], checked_out())
        pool.add_metric(["idle"], idle())
        yield pool


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe_http(
                scope["method"], route_template(scope), status, time.perf_counter() - started
            )


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/api/v1/rooms/{room_id}`), never the raw path."""
    template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str) and template:
        return _with_prefix(scope, template)
    if "app_root_path" in scope:  # a Mount (the web client's files): its prefix, then any path
        mounted_at: str = scope.get("root_path", "")
        return mounted_at[len(scope["app_root_path"]) :] + "/{path}"
    if "endpoint" in scope and not scope.get("path_params"):
        return _route_path(scope)  # a plain route without parameters (the API docs)
    return UNMATCHED_ROUTE


def _with_prefix(scope: Scope, template: str) -> str:
    """FastAPI leaves an included router's route in the scope with its own path, without the
    router's prefix (`/rooms/{room_id}`): the prefix is what precedes that route's rendered
    path in the request path."""
    params = scope.get("path_params") or {}
    try:
        rendered = template.format_map({key: str(value) for key, value in params.items()})
    except (KeyError, IndexError, ValueError):
        return template
    path = _route_path(scope)
    if not path.endswith(rendered):
        return template
    return path[: len(path) - len(rendered)] + template


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


@functools.cache
def detached() -> Metrics:
    """A Metrics nobody scrapes: the default for parts built without the app's (in tests)."""
    return Metrics()
