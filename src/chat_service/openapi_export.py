"""The committed OpenAPI document is this function's output; a test keeps the two equal."""

import json

from fastapi import FastAPI

REGENERATE_COMMAND = "uv run chat-service openapi --output openapi/openapi.json"


def render_openapi(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"
