"""Domain logic shared by the REST API and the WebSocket gateway."""
