"""chat-service: authenticated real-time chat over REST and WebSocket."""

__version__ = "0.1.0"
