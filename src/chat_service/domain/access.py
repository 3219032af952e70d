"""Who may see and do what in a room. Private rooms never reveal themselves to outsiders."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import and_, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.errors import Forbidden, NotFound
from chat_service.models import Membership, Room, User
from chat_service.schemas import UserSummary

OWNER = "owner"
MEMBER = "member"
PUBLIC = "public"


class RoomNotFound(NotFound):
    code = "room_not_found"
    detail = "Room not found"


class NotMember(Forbidden):
    code = "not_member"
    detail = "Join this room first"


@dataclass(frozen=True)
class RoomAccess:
    room: Room
    membership: Membership | None

    def member(self) -> Membership:
        if self.membership is None:
            raise NotMember()
        return self.membership

    def owner(self) -> Membership:
        membership = self.member()
        if membership.role != OWNER:
            raise Forbidden("Only the room's owner can do this", code="not_owner")
        return membership


async def room_access(db: AsyncSession, room_id: str, user_id: str) -> RoomAccess:
    """The room and my membership; 404 for a missing room or a private one I am not in."""
    row = (
        await db.exec(
            select(Room, Membership)
            .outerjoin(
                Membership,
                and_(col(Membership.room_id) == Room.id, col(Membership.user_id) == user_id),
            )
            .where(Room.id == room_id)
        )
    ).first()
    if row is None:
        raise RoomNotFound()
    room, membership = row
    if room.visibility != PUBLIC and membership is None:
        raise RoomNotFound()
    return RoomAccess(room, membership)


def user_summary(user: User) -> UserSummary:
    return UserSummary(id=user.id, username=user.username, display_name=user.display_name)
