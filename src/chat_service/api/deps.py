"""FastAPI dependencies: resources made in the lifespan, and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from chat_service.domain.accounts import AccountService, Principal
from chat_service.domain.history import HistoryService
from chat_service.domain.messages import MessageService
from chat_service.domain.rooms import RoomService
from chat_service.errors import Unauthorized

# auto_error=False: a missing token gets the contract's error body, not FastAPI's default.
bearer_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


async def get_accounts(request: Request) -> AccountService:
    accounts: AccountService = request.app.state.accounts
    return accounts


AccountsDep = Annotated[AccountService, Depends(get_accounts)]


async def get_rooms(request: Request) -> RoomService:
    rooms: RoomService = request.app.state.rooms
    return rooms


RoomsDep = Annotated[RoomService, Depends(get_rooms)]


async def get_messages(request: Request) -> MessageService:
    messages: MessageService = request.app.state.messages
    return messages


MessagesDep = Annotated[MessageService, Depends(get_messages)]


async def get_history(request: Request) -> HistoryService:
    history: HistoryService = request.app.state.history
    return history


HistoryDep = Annotated[HistoryService, Depends(get_history)]


async def get_principal(
    accounts: AccountsDep, token: Annotated[str | None, Depends(bearer_scheme)]
) -> Principal:
    if not token:
        raise Unauthorized("Missing bearer token", code="not_authenticated")
    return await accounts.authenticate(token)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def client_ip(request: Request) -> str:
    """The peer address (uvicorn rewrites it from X-Forwarded-For for trusted proxies only)."""
    return request.client.host if request.client else "unknown"


ClientIP = Annotated[str, Depends(client_ip)]
