"""Accounts and tokens: /auth/* and /users/me."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Response, status

from chat_service.api.deps import AccountsDep, ClientIP, CurrentPrincipal
from chat_service.domain.accounts import Outcome
from chat_service.errors import error_responses
from chat_service.ratelimit import rate_limit_headers
from chat_service.schemas import (
    AuthResult,
    LoginRequest,
    RefreshRequest,
    UserCreate,
    UserPublic,
    WsTicket,
)

router = APIRouter(tags=["auth"])


def _answer(outcome: Outcome, response: Response) -> AuthResult:
    response.headers.update(rate_limit_headers(outcome.usages))
    return outcome.result


@router.post(
    "/auth/signup",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(409, 422, 429),
)
async def signup(
    data: UserCreate, accounts: AccountsDep, ip: ClientIP, response: Response
) -> AuthResult:
    """Create an account and log it in."""
    return _answer(await accounts.signup(data, ip), response)


@router.post("/auth/token", responses=error_responses(401, 403, 422, 429))
async def token(
    username: Annotated[str, Form(max_length=256)],
    password: Annotated[str, Form(max_length=1024)],
    accounts: AccountsDep,
    ip: ClientIP,
    response: Response,
) -> AuthResult:
    """Log in with an OAuth2 password form (what /docs' Authorize button sends)."""
    return _answer(await accounts.login(username, password, ip), response)


@router.post("/auth/login", responses=error_responses(401, 403, 422, 429))
async def login(
    data: LoginRequest, accounts: AccountsDep, ip: ClientIP, response: Response
) -> AuthResult:
    """Log in with a JSON body."""
    return _answer(await accounts.login(data.username, data.password, ip), response)


@router.post("/auth/refresh", responses=error_responses(401, 403, 422))
async def refresh(data: RefreshRequest, accounts: AccountsDep) -> AuthResult:
    """Swap a refresh token for a new pair; each refresh token works once."""
    return await accounts.refresh(data.refresh_token)


@router.post(
    "/auth/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 422),
)
async def logout(data: RefreshRequest, principal: CurrentPrincipal, accounts: AccountsDep) -> None:
    """End the session of this refresh token: its tokens stop working."""
    await accounts.logout(principal, data.refresh_token)


@router.post("/auth/ws-ticket", responses=error_responses(401, 403))
async def ws_ticket(principal: CurrentPrincipal, accounts: AccountsDep) -> WsTicket:
    """Get a single-use ticket for opening a WebSocket from a browser."""
    return await accounts.issue_ticket(principal)


@router.get("/users/me", tags=["users"], responses=error_responses(401, 403))
async def me(principal: CurrentPrincipal) -> UserPublic:
    """The logged-in user."""
    return UserPublic.model_validate(principal.user, from_attributes=True)
