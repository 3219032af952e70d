"""Graceful shutdown: on SIGTERM, report not-ready, drain the sockets, then let uvicorn stop.

uvicorn's own shutdown closes every socket at once; draining first lets queued frames reach
their clients and tells each one to reconnect (1012) before the process goes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from chat_service.realtime.gateway import Gateway

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Lifecycle:
    def __init__(self, gateway: Gateway, *, drain_delay_s: float, flush_timeout_s: float) -> None:
        self.draining = False
        self._gateway = gateway
        self._drain_delay_s = drain_delay_s
        self._flush_timeout_s = flush_timeout_s
        self._previous: dict[int, Any] = {}
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Put our handler in front of the server's (signals are only for the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(
                sig, lambda s, f: loop.call_soon_threadsafe(self._on_signal, s, f)
            )

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    async def shutdown(self) -> None:
        """Drain now (lifespan shutdown, or a server run without signal handling)."""
        self.draining = True
        await self._gateway.drain(self._flush_timeout_s)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: stop waiting
            self._pass_on(sig, frame)
            return
        log.info("shutdown requested: draining connections", extra={"signal": sig})
        self.draining = True
        self._task = asyncio.create_task(self._drain_then_stop(sig, frame))

    async def _drain_then_stop(self, sig: int, frame: FrameType | None) -> None:
        try:
            await asyncio.sleep(self._drain_delay_s)  # load balancers see /readyz fail first
            await self._gateway.drain(self._flush_timeout_s)
        finally:
            self._pass_on(sig, frame)

    def _pass_on(self, sig: int, frame: FrameType | None) -> None:
        previous: Callable[[int, FrameType | None], Any] | Any = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
