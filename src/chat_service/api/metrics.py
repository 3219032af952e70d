"""`GET /metrics`: this process's metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from chat_service.metrics import CONTENT_TYPE, Metrics

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format (version 0.0.4)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    """This process's metrics for Prometheus: HTTP requests, WebSocket connections, messages
    in and out, fan-out latency, queue drops, rate-limit hits, auth failures, and the process
    itself (memory, file descriptors, asyncio tasks). Each worker answers for itself; every
    metric is described in docs/operations.md."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
