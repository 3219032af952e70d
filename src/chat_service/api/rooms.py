"""Rooms and membership: /rooms, /rooms/{id}, join, leave, members."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from chat_service.api.deps import CurrentPrincipal, RoomsDep
from chat_service.errors import error_responses
from chat_service.schemas import (
    MemberAdd,
    MemberPage,
    MembershipPublic,
    RoomCreate,
    RoomListItem,
    RoomPage,
    RoomPublic,
    RoomUpdate,
)

router = APIRouter(prefix="/rooms", tags=["rooms"])

Cursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page")
]


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(401, 403, 422))
async def create_room(data: RoomCreate, principal: CurrentPrincipal, rooms: RoomsDep) -> RoomPublic:
    """Create a room; I become its owner."""
    return await rooms.create(principal.user.id, data)


@router.get("", responses=error_responses(401, 403, 422))
async def list_rooms(
    principal: CurrentPrincipal,
    rooms: RoomsDep,
    q: Annotated[
        str | None, Query(max_length=100, description="Part of the name, any case")
    ] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RoomPage:
    """Public rooms and the rooms I belong to, oldest first, with my unread counts."""
    return await rooms.list(principal.user.id, query=q, cursor=cursor, limit=limit)


@router.get("/{room_id}", responses=error_responses(401, 403, 404, 422))
async def get_room(room_id: str, principal: CurrentPrincipal, rooms: RoomsDep) -> RoomListItem:
    """One room (private rooms only for their members)."""
    return await rooms.get(principal.user.id, room_id)


@router.patch("/{room_id}", responses=error_responses(401, 403, 404, 422))
async def update_room(
    room_id: str, data: RoomUpdate, principal: CurrentPrincipal, rooms: RoomsDep
) -> RoomPublic:
    """Rename or describe a room, or change its visibility (owner only)."""
    return await rooms.update(principal.user.id, room_id, data)


@router.delete(
    "/{room_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 422),
)
async def delete_room(room_id: str, principal: CurrentPrincipal, rooms: RoomsDep) -> None:
    """Delete a room and its messages (owner only)."""
    await rooms.delete(principal.user.id, room_id)


@router.post("/{room_id}/join", responses=error_responses(401, 403, 404, 422))
async def join_room(room_id: str, principal: CurrentPrincipal, rooms: RoomsDep) -> MembershipPublic:
    """Become a member of a public room (joining twice is harmless)."""
    return await rooms.join(principal.user.id, room_id)


@router.post(
    "/{room_id}/leave",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def leave_room(room_id: str, principal: CurrentPrincipal, rooms: RoomsDep) -> None:
    """Stop being a member (the owner cannot leave)."""
    await rooms.leave(principal.user.id, room_id)


@router.get("/{room_id}/members", responses=error_responses(401, 403, 404, 422))
async def list_members(
    room_id: str,
    principal: CurrentPrincipal,
    rooms: RoomsDep,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> MemberPage:
    """The room's members with their role and whether they are online (members only)."""
    return await rooms.members(principal.user.id, room_id, cursor=cursor, limit=limit)


@router.post(
    "/{room_id}/members",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": MembershipPublic, "description": "Already a member: nothing changed"},
        **error_responses(401, 403, 404, 422),
    },
)
async def add_member(
    room_id: str,
    data: MemberAdd,
    principal: CurrentPrincipal,
    rooms: RoomsDep,
    response: Response,
) -> MembershipPublic:
    """Add a user by username: the way into a private room (owner only)."""
    membership, created = await rooms.add_member(principal.user.id, room_id, data.username)
    if not created:
        response.status_code = status.HTTP_200_OK
    return membership


@router.delete(
    "/{room_id}/members/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def remove_member(
    room_id: str, user_id: str, principal: CurrentPrincipal, rooms: RoomsDep
) -> None:
    """Remove a member (owner only); their live subscriptions end with `room.removed`."""
    await rooms.remove_member(principal.user.id, room_id, user_id)
