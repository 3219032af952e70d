"""The application factory and its lifespan, where every shared resource is made and closed."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from chat_service import __version__
from chat_service.api import auth, health, messages, rooms
from chat_service.api.input_guard import InputGuard
from chat_service.api.metrics import router as metrics_router
from chat_service.api.request_ids import HEADER as REQUEST_ID_HEADER
from chat_service.api.request_ids import RequestIdMiddleware
from chat_service.api.ws import WebSocketEndpoints
from chat_service.broker import REDIS_SCHEMES, broker_from_url
from chat_service.db import HeldConnection, create_engine, create_session_factory
from chat_service.domain.accounts import AccountService
from chat_service.domain.events import EventBus
from chat_service.domain.history import HistoryService
from chat_service.domain.messages import MessageService
from chat_service.domain.rooms import RoomService
from chat_service.errors import error_responses, install_error_handlers
from chat_service.lifecycle import Lifecycle
from chat_service.logging_config import configure_logging
from chat_service.metrics import HttpMetricsMiddleware, Metrics
from chat_service.ratelimit import RateLimiter
from chat_service.realtime.fanout import Fanout
from chat_service.realtime.gateway import Gateway
from chat_service.realtime.hub import Hub
from chat_service.realtime.presence import ClusterPresence, LocalPresence
from chat_service.security.passwords import PasswordHasher
from chat_service.security.tokens import AccessTokenCodec
from chat_service.settings import Settings, load_settings

API_PREFIX = "/api/v1"
WEB_DIR = Path(__file__).parent / "web"
DESCRIPTION = """
Authenticated real-time chat. REST for accounts, rooms and history; a WebSocket at `/ws` for
live messages (see `openapi/asyncapi.yaml` and `docs/protocol.md`).

Every error answers `{"detail": "...", "code": "..."}` (plus `errors` on 422). Rate-limited
endpoints send `RateLimit-Policy` and `RateLimit` headers, and `Retry-After` with 429.
"""


class WebClient(Mount):
    """The demo web client (`src/chat_service/web`) at `/`, after every other route.

    It takes only GET and HEAD requests for `/` and its own files; anything else falls through
    to the router as before (JSON 404, 405 for a wrong method, trailing-slash redirects,
    refused WebSockets). Being a Mount, it stays out of the OpenAPI document.
    """

    def __init__(self) -> None:
        super().__init__("/", app=StaticFiles(directory=WEB_DIR, html=True), name="web")
        files = (path for path in WEB_DIR.rglob("*") if path.is_file())
        self.paths = {"/"} | {"/" + path.relative_to(WEB_DIR).as_posix() for path in files}

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return Match.NONE, {}
        path, root_path = scope["path"], scope.get("root_path", "")
        if root_path and path.startswith(root_path + "/"):
            path = path[len(root_path) :]
        if path not in self.paths:
            return Match.NONE, {}
        return super().matches(scope)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engine = create_engine(settings)
    hasher = PasswordHasher(
        memory_kib=settings.argon2_memory_kib,
        time_cost=settings.argon2_time_cost,
        parallelism=settings.argon2_parallelism,
        concurrency=settings.password_hash_concurrency,
    )
    codec = AccessTokenCodec(
        secret=settings.jwt_secret,
        algorithm=settings.jwt_algorithm,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_s=settings.access_token_ttl_s,
    )
    limiter = RateLimiter(settings.resolved_rate_limit_storage_url, metrics)
    sessions = create_session_factory(engine)
    events = EventBus()
    hub = Hub()
    hub.metrics = metrics
    fanout = Fanout(broker_from_url(settings.broker_url), hub)
    hub.on_room_idle = fanout.room_idle
    events.subscribe(fanout.publish)
    events.subscribe(metrics.on_event)
    presence = (
        ClusterPresence(hub, events, settings.broker_url, settings.presence_ttl_s)
        if settings.broker_url.startswith(REDIS_SCHEMES)
        else LocalPresence(hub, events)
    )
    token_reads = HeldConnection(engine)
    accounts = AccountService(sessions, token_reads, hasher, codec, limiter, events, settings)
    rooms = RoomService(sessions, events, online_ids=presence.online_ids)
    batch_writes = HeldConnection(engine)
    messages = MessageService(sessions, batch_writes, events, limiter, settings)
    history = HistoryService(sessions)
    gateway = Gateway(
        settings=settings,
        hub=hub,
        fanout=fanout,
        presence=presence,
        limiter=limiter,
        metrics=metrics,
        events=events,
        accounts=accounts,
        rooms=rooms,
        messages=messages,
        history=history,
    )
    lifecycle = Lifecycle(
        gateway,
        drain_delay_s=settings.shutdown_drain_delay_s,
        flush_timeout_s=settings.shutdown_grace_s / 2,
    )
    app.state.engine = engine
    app.state.limiter = limiter
    app.state.events = events
    app.state.hub = hub
    app.state.presence = presence
    app.state.broker = fanout.broker
    app.state.accounts = accounts
    app.state.rooms = rooms
    app.state.messages = messages
    app.state.history = history
    app.state.gateway = gateway
    app.state.lifecycle = lifecycle
    metrics.runtime.bind(
        loop=asyncio.get_running_loop(),
        hub_stats=hub.stats,
        broker_healthy=lambda: fanout.broker.healthy,
        pool=engine.sync_engine.pool,
    )
    await fanout.start()
    await presence.start()
    lifecycle.install()
    try:
        yield
    finally:
        lifecycle.uninstall()
        await lifecycle.shutdown()
        await presence.stop()  # its last `offline` events still go out through the fan-out
        await fanout.stop()
        hasher.close()
        await token_reads.close()
        await batch_writes.close()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(
        title="chat-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()  # this app's own registry
    install_error_handlers(app)
    app.add_middleware(InputGuard)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
        expose_headers=["Retry-After", "RateLimit", "RateLimit-Policy", REQUEST_ID_HEADER],
        max_age=600,
    )
    # Outermost last: ids and metrics cover every answer, CORS preflights included; the
    # WebSocket endpoints sit just inside the request id (api/ws.py says why).
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(WebSocketEndpoints)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    if settings.metrics_enabled:
        app.include_router(metrics_router)
    # Any route that touches the database can answer 503 while it is unreachable, and any
    # may be sent a body too large to read (api/input_guard.py).
    for router in (auth.router, rooms.router, messages.router):
        app.include_router(router, prefix=API_PREFIX, responses=error_responses(413, 503))
    app.router.routes.append(WebClient())  # last: it must not shadow the API
    return app


def app_factory() -> FastAPI:
    """What uvicorn calls in each worker process: settings from the environment, logging set,
    the garbage collector tuned for a long-lived server."""
    settings = load_settings()
    configure_logging(settings)
    app = create_app(settings)
    tune_garbage_collector()
    return app


# Allocations between young-generation collections (CPython's default is 700): a frame's
# short-lived dicts and models die before a collection sees them, and fewer survive into the
# older generations, whose collections walk every live object.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Freeze what start-up loaded (modules, routes, schemas: ~140,000 objects that live as
    long as the process), so that no full collection walks it again (~45 ms each on the bench
    machine), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
