"""Message history, sending, editing, deleting, and read cursors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from chat_service.api.deps import CurrentPrincipal, HistoryDep, MessagesDep
from chat_service.errors import error_responses
from chat_service.schemas import (
    MessageCreate,
    MessagePage,
    MessagePublic,
    MessageUpdate,
    ReadCursor,
)

router = APIRouter(prefix="/rooms/{room_id}", tags=["messages"])

Seq = Annotated[int, Path(ge=1, description="The message's seq in the room")]


@router.get("/messages", responses=error_responses(401, 403, 404, 422))
async def history(
    room_id: str,
    principal: CurrentPrincipal,
    history: HistoryDep,
    before_seq: Annotated[
        int | None, Query(ge=1, description="The newest messages with a smaller seq")
    ] = None,
    after_seq: Annotated[
        int | None,
        Query(
            ge=0,
            description="Every message changed (sent, edited, deleted) after this seq, "
            "in change order: poll with the last `change_seq` seen",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> MessagePage:
    """A page of messages in ascending order (members only)."""
    return await history.page(
        principal.user.id, room_id, before_seq=before_seq, after_seq=after_seq, limit=limit
    )


@router.post(
    "/messages",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "model": MessagePublic,
            "description": "This client_id was sent before: the original",
        },
        **error_responses(401, 403, 404, 409, 422, 429),
    },
)
async def send_message(
    room_id: str,
    data: MessageCreate,
    principal: CurrentPrincipal,
    messages: MessagesDep,
    response: Response,
) -> MessagePublic:
    """Send a message; subscribers get it as `message.new`."""
    sent = await messages.send(principal.user.id, room_id, data.body, data.client_id)
    if not sent.created:
        response.status_code = status.HTTP_200_OK
    return sent.message


@router.patch("/messages/{seq}", responses=error_responses(401, 403, 404, 409, 422))
async def edit_message(
    room_id: str, seq: Seq, data: MessageUpdate, principal: CurrentPrincipal, messages: MessagesDep
) -> MessagePublic:
    """Change my message's body; subscribers get `message.updated`."""
    return await messages.edit(principal.user.id, room_id, seq, data.body)


@router.delete(
    "/messages/{seq}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 422),
)
async def delete_message(
    room_id: str, seq: Seq, principal: CurrentPrincipal, messages: MessagesDep
) -> None:
    """Delete a message (author or owner): the body goes, a tombstone stays."""
    await messages.delete(principal.user.id, room_id, seq)


@router.post(
    "/read",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 422),
)
async def mark_read(
    room_id: str, data: ReadCursor, principal: CurrentPrincipal, messages: MessagesDep
) -> None:
    """Move my read cursor forward to `seq` (drives `unread_count`)."""
    await messages.mark_read(principal.user.id, room_id, data.seq)
