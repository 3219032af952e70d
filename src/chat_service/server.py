"""uvicorn's settings for this service, in one place for `serve` and the tests."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from chat_service.settings import Settings

# How long a socket may sit with unsent data once the app is done with it.
ABORT_STUCK_AFTER_S = 5.0


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, minus one leak: a peer that stopped reading.

    When the app is done, uvicorn closes the transport, and asyncio waits for the send buffer
    to drain before it lets the socket go, which for such a peer is never: its kernel buffers
    (megabytes) stay held. Aborting the transport after a grace period releases them.
    """

    async def run_asgi(self) -> None:
        await super().run_asgi()
        self.loop.call_later(ABORT_STUCK_AFTER_S, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if not self.disconnected:
            self.transport.abort()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "ws": WebSocketProtocol,
        # Compression costs ~30 KiB per socket and invites CRIME-style leaks.
        "ws_per_message_deflate": False,
        "ws_max_size": settings.frame_max_bytes,
        "ws_ping_interval": settings.heartbeat_interval_s,
        "ws_ping_timeout": settings.heartbeat_timeout_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "server_header": False,
        "log_config": None,
    }
