"""uvicorn's settings for this service, in one place for `serve` and the tests."""

from __future__ import annotations

from typing import Any

from chat_service.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "ws": "websockets-sansio",
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
