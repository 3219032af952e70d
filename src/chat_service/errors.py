"""Domain errors, and the one place that turns them (and every other failure) into HTTP answers.

Every error body has the contract's shape: ``{"detail": str, "code": str}``, plus ``errors``
for validation failures. The WebSocket gateway maps the same DomainError codes to error frames.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from chat_service.logging_config import current_request_id

log = logging.getLogger(__name__)


class DomainError(Exception):
    """A failure the client can understand; `code` is the stable machine-readable part."""

    status: int = HTTPStatus.BAD_REQUEST
    code: str = "bad_request"
    detail: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.detail = detail or self.detail
        self.code = code or self.code
        self.headers = dict(headers or {})
        self.extra = extra  # more fields for the error body, e.g. `errors` on a 422
        super().__init__(self.detail)


class InvalidInput(DomainError):
    """Input that passed the schema but not a rule; `field` names it, as validation errors do."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid"
    detail = "Invalid input"

    def __init__(
        self, detail: str, *, field: str, code: str | None = None, location: str = "body"
    ) -> None:
        error = {"loc": [location, field], "msg": detail, "type": code or self.code}
        super().__init__(detail, code=code, errors=[error])


class Unauthorized(DomainError):
    status = HTTPStatus.UNAUTHORIZED
    code = "invalid_token"
    detail = "Missing, invalid or expired credentials"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(DomainError):
    status = HTTPStatus.FORBIDDEN
    code = "forbidden"
    detail = "You are not allowed to do this"


class NotFound(DomainError):
    status = HTTPStatus.NOT_FOUND
    code = "not_found"
    detail = "Not found"


class Conflict(DomainError):
    status = HTTPStatus.CONFLICT
    code = "conflict"
    detail = "Conflict"


class RateLimited(DomainError):
    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "rate_limited"
    detail = "Too many requests; retry later"

    def __init__(self, retry_after: int, headers: Mapping[str, str] | None = None) -> None:
        self.retry_after = max(1, retry_after)
        super().__init__(
            f"Too many requests; retry in {self.retry_after} s",
            headers={**(headers or {}), "Retry-After": str(self.retry_after)},
        )


class Unavailable(DomainError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"
    detail = "A backing service is unavailable; retry later"


# What a database outage looks like from here: refused or dropped connections, timeouts.
# These become 503 `unavailable` (1013 on a socket), never 500: retrying later will work.
STORAGE_FAILURES: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    OSError,
    TimeoutError,
)


# SQLSTATE classes of a server that went away or is not serving: connection exceptions (08)
# and operator intervention (57P: shutting down, crashed, starting up).
_UNAVAILABLE_SQLSTATES = ("08", "57P")


def is_storage_failure(exc: BaseException) -> bool:
    """Is `exc` the database being unreachable (answer 503 / 1013), not a bug (500 / 1011)?

    Besides refused connections and timeouts, a Postgres that is restarting answers with
    errors that SQLAlchemy passes on as plain DBAPIErrors.
    """
    if isinstance(exc, STORAGE_FAILURES):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    driver_error = exc.orig.__cause__ if exc.orig is not None else None
    for error in (exc.orig, driver_error):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    # asyncpg's "cannot switch to state ...": a connection left mid-operation by a dying server.
    return type(driver_error).__name__ == "InternalClientError"


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: str
    code: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    """The body of a 422: which fields failed and why."""

    errors: list[FieldError]


_HTTP_CODES = {
    400: "bad_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "code": code, **extra}, status_code=status, headers=dict(headers or {})
    )


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    if isinstance(exc, Unauthorized) or exc.code == "account_disabled":
        request.app.state.metrics.auth_failed(exc.code, "http")
    return error_response(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == HTTPStatus.BAD_REQUEST:
        # FastAPI's only 400: a body it could not parse (not UTF-8, a broken form). To a
        # client that is the same mistake as malformed JSON, which answers 422.
        error = {"loc": ["body"], "msg": str(exc.detail), "type": "body_unreadable"}
        return error_response(422, "invalid", "The request body could not be read", errors=[error])
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    code = _HTTP_CODES.get(exc.status_code, HTTPStatus(exc.status_code).phrase.lower())
    return error_response(exc.status_code, code.replace(" ", "_"), detail, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        # Echoing the rejected input would reflect passwords back: only where and why.
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error["type"]}
        for error in exc.errors()
    ]
    return error_response(422, "invalid", "The request is not valid", errors=errors)


async def _storage_failure(request: Request, exc: Exception) -> JSONResponse:
    log.warning(
        "storage unavailable",
        extra={"path": request.url.path, "error": type(exc).__name__},
    )
    return error_response(503, Unavailable.code, Unavailable.detail, headers={"Retry-After": "1"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_storage_failure(exc):
        return await _storage_failure(request, exc)
    return await _unexpected_error(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"path": request.url.path, "method": request.method},
    )
    request_id = current_request_id()  # answered outside the request-id middleware
    headers = {"X-Request-ID": request_id} if request_id else None
    return error_response(500, "internal", "Internal server error", headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for failure in STORAGE_FAILURES:
        app.add_exception_handler(failure, _storage_failure)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can answer."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        model = ValidationErrorBody if status == 422 else ErrorBody
        responses[status] = {"model": model, "description": HTTPStatus(status).phrase}
    return responses


def socket_error(exc: Exception) -> tuple[str, str, int | None]:
    """The WebSocket error frame (code, detail, retry_after) for a failure handling a frame."""
    if isinstance(exc, RateLimited):
        return "rate_limited", exc.detail, exc.retry_after
    if isinstance(exc, NotFound):
        return "not_found", exc.detail, None
    if isinstance(exc, Forbidden | Unauthorized):
        return "forbidden", exc.detail, None
    if isinstance(exc, InvalidInput):
        return ("too_large" if exc.code == "too_large" else "invalid_frame"), exc.detail, None
    if isinstance(exc, DomainError):
        return "invalid_frame", exc.detail, None
    if is_storage_failure(exc):
        return "unavailable", "Storage is unavailable: nothing was stored; retry later", 1
    return "internal", "Internal server error", None
