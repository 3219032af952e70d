"""The real-time side: WebSocket gateway, per-process hub, frames and connections."""
