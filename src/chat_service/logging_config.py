"""Structured logs (JSON or console) with secrets redacted, uvicorn's own lines included.

Every line logged while serving an HTTP request carries that request's `request_id`, and every
line logged for an accepted WebSocket its `connection_id` (the one `hello` tells the client):
both come from context variables, so they reach lines logged by uvicorn and libraries too.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

from chat_service.settings import Settings

# Query parameters that may carry a credential (uvicorn logs paths with their query strings).
_SECRET_PARAMS = re.compile(
    r"(?i)([?&](?:ticket|token|access_token|refresh_token|password)=)[^&\s\"']*"
)
_BEARER = re.compile(r"(?i)(bearer[ .])[A-Za-z0-9\-_.~+/=]+")
# Attributes every record has; the rest are `extra=` fields. uvicorn's color_message repeats msg.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


# Set per request (api/request_ids.py) and per WebSocket connection (the gateway). Each request
# and connection runs in its own task, so a value never leaks into another one's lines.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
request_started_var: ContextVar[float | None] = ContextVar("request_started", default=None)
connection_id_var: ContextVar[str | None] = ContextVar("connection_id", default=None)

# uvicorn's access line: client address, method, path with query string, HTTP version, status.
_ACCESS_ARGS = 5


def bind_connection(connection_id: str) -> None:
    """From here on, this task (and the tasks it starts) logs with `connection_id`."""
    connection_id_var.set(connection_id)


def current_request_id() -> str | None:
    return request_id_var.get()


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _SECRET_PARAMS.sub(r"\1[redacted]", text))


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites every record so no token or ticket reaches a log line: the message, its
    arguments, `extra=` fields and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {key: _redact_value(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact_value(arg) for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class ContextFields(logging.Filter):
    """Adds the request and connection ids of the task that logs, and gives uvicorn's access
    lines structured fields. Runs before RedactSecrets, which then cleans the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        connection_id = connection_id_var.get()
        if connection_id is not None and not hasattr(record, "connection_id"):
            record.connection_id = connection_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            _access_fields(record, record.args)
        return True


def _access_fields(record: logging.LogRecord, args: tuple[Any, ...]) -> None:
    if len(args) != _ACCESS_ARGS:
        return
    record.client, record.method, record.path, _version, record.status = args
    started = request_started_var.get()
    if started is not None:
        # Logged as the response starts: the time to the headers, not to the last byte.
        record.duration_ms = round((time.perf_counter() - started) * 1000, 2)


class DropFrameDumps(logging.Filter):
    """At DEBUG the websockets library logs every frame it reads and writes (`< TEXT '...'`)
    on uvicorn's logger: message bodies and tokens. Those lines never reach a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.DEBUG
            and record.msg in ("< %s", "> %s")
            and "websockets" in record.pathname
        )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in _STANDARD_ATTRS
        )
        if record.exc_info:
            entry["exc"] = record.exc_text or redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(DropFrameDumps())
    handler.addFilter(ContextFields())  # before the redaction, which cleans what it adds
    handler.addFilter(RedactSecrets())
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = ConsoleFormatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ"
        )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # SQLAlchemy and Alembic at INFO would log SQL parameters (message bodies, hashes), and
    # aiosqlite at DEBUG every statement it runs with its parameters.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
