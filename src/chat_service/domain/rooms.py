"""Rooms and membership: create, list, update, delete, join, leave, add and remove members."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, and_, col, delete, func, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.db import SessionFactory, statement_options
from chat_service.domain.access import (
    MEMBER,
    OWNER,
    PUBLIC,
    RoomAccess,
    RoomNotFound,
    room_access,
    user_summary,
)
from chat_service.domain.events import Event, EventSink
from chat_service.errors import Conflict, InvalidInput, NotFound
from chat_service.models import Membership, Message, Room, User
from chat_service.schemas import (
    MemberPage,
    MemberPublic,
    MembershipPublic,
    RoomCreate,
    RoomListItem,
    RoomPage,
    RoomPublic,
    RoomUpdate,
    UserSummary,
)


class InvalidCursor(InvalidInput):
    def __init__(self) -> None:
        super().__init__(
            "This cursor is not one the API gave out",
            field="cursor",
            code="invalid_cursor",
            location="query",
        )


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        value = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor() from exc
    if not value.isalnum():  # cursors carry ids, which are hex
        raise InvalidCursor()
    return value


def _member_count() -> Any:
    return (
        select(func.count())
        .where(col(Membership.room_id) == Room.id)
        .correlate(Room)
        .scalar_subquery()
    )


class RoomService:
    def __init__(
        self,
        sessions: SessionFactory,
        events: EventSink,
        online_ids: Callable[[str], Awaitable[set[str]]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._events = events
        self._online_ids = online_ids or _nobody_online

    async def create(self, user_id: str, data: RoomCreate) -> RoomPublic:
        async with self._sessions() as db:
            room = Room(owner_id=user_id, **data.model_dump())
            db.add(room)
            await db.flush()  # no ORM relationships: the room row must exist first
            db.add(Membership(room_id=room.id, user_id=user_id, role=OWNER))
            await db.commit()
        return _room_public(room, member_count=1)

    async def list(
        self, user_id: str, *, query: str | None, cursor: str | None, limit: int
    ) -> RoomPage:
        """Public rooms and mine, in creation order, with my read state for mine."""
        mine = and_(col(Membership.room_id) == Room.id, col(Membership.user_id) == user_id)
        unread = (
            select(func.count())
            .where(*_unread(Room.id, Membership.last_read_seq, user_id))
            .correlate(Room, Membership)
            .scalar_subquery()
        )
        statement = (
            select(Room, Membership, _member_count().label("members"), unread.label("unread"))
            .outerjoin(Membership, mine)
            .where(or_(col(Room.visibility) == PUBLIC, col(Membership.user_id).is_not(None)))
            .order_by(col(Room.id))
            .limit(limit + 1)
        )
        if query:
            escaped = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            statement = statement.where(func.lower(Room.name).like(f"%{escaped}%", escape="\\"))
        after = decode_cursor(cursor)
        if after is not None:
            statement = statement.where(col(Room.id) > after)
        async with self._sessions() as db:
            rows = (await db.exec(statement)).all()
        items = [
            _room_item(room, membership, members, unread)
            for room, membership, members, unread in rows[:limit]
        ]
        next_cursor = encode_cursor(items[-1].id) if len(rows) > limit else None
        return RoomPage(items=items, next_cursor=next_cursor)

    async def get(self, user_id: str, room_id: str) -> RoomListItem:
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            members = await _count_members(db, room_id)
            unread = await _count_unread(db, access) if access.membership else None
        return _room_item(access.room, access.membership, members, unread)

    async def update(self, user_id: str, room_id: str, data: RoomUpdate) -> RoomPublic:
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            access.owner()
            room = access.room
            for name, value in data.model_dump(exclude_unset=True, exclude_none=True).items():
                setattr(room, name, value)
            db.add(room)
            await db.commit()
            public = _room_public(room, await _count_members(db, room_id))
        self._events.publish(
            Event("room.updated", {"room": public.model_dump(mode="json")}, room_id=room_id)
        )
        return public

    async def delete(self, user_id: str, room_id: str) -> None:
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).owner()
            await db.exec(delete(Room).where(col(Room.id) == room_id))
            await db.commit()
        self._events.publish(Event("room.deleted", {"room_id": room_id}, room_id=room_id))

    async def join(self, user_id: str, room_id: str) -> MembershipPublic:
        """Become a member of a public room; joining again changes nothing. A WebSocket join
        comes here every time: for a member, one read and no write."""
        async with self._sessions() as db:
            connection = await db.connection(execution_options=statement_options(db))
            params = {"room_id": room_id, "user_id": user_id}
            row = (await connection.execute(SELECT_MY_JOIN, params)).first()
        if row is None or (row.role is None and row.visibility != PUBLIC):
            raise RoomNotFound()
        if row.role is not None:
            return MembershipPublic(
                room_id=room_id,
                user=UserSummary(id=user_id, username=row.username, display_name=row.display_name),
                role=row.role,
                joined_at=row.joined_at,
                last_read_seq=row.last_read_seq,
            )
        async with self._sessions() as db:
            await _insert_membership(db, room_id, user_id)
            return await _membership_public(db, room_id, user_id)

    async def leave(self, user_id: str, room_id: str) -> None:
        async with self._sessions() as db:
            access = await room_access(db, room_id, user_id)
            if access.membership is None:
                return
            if access.membership.role == OWNER:
                raise Conflict(
                    "The owner cannot leave; delete the room instead", code="owner_cannot_leave"
                )
            await _delete_membership(db, room_id, user_id)
            await db.commit()
        self._end_subscription(room_id, user_id, "left")

    async def members(
        self, user_id: str, room_id: str, *, cursor: str | None, limit: int
    ) -> MemberPage:
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).member()
            statement = (
                select(Membership, User)
                .join(User, col(User.id) == Membership.user_id)
                .where(col(Membership.room_id) == room_id)
                .order_by(col(Membership.user_id))
                .limit(limit + 1)
            )
            after = decode_cursor(cursor)
            if after is not None:
                statement = statement.where(col(Membership.user_id) > after)
            rows = (await db.exec(statement)).all()
        online = await self._online_ids(room_id)
        items = [
            MemberPublic(**_membership_fields(membership, user), online=user.id in online)
            for membership, user in rows[:limit]
        ]
        next_cursor = encode_cursor(items[-1].user.id) if len(rows) > limit else None
        return MemberPage(items=items, next_cursor=next_cursor)

    async def add_member(
        self, user_id: str, room_id: str, username: str
    ) -> tuple[MembershipPublic, bool]:
        """Add someone by username (the way into a private room); True when newly added."""
        async with self._sessions() as db:
            (await room_access(db, room_id, user_id)).owner()
            target = (
                await db.exec(select(User).where(User.username_key == username.lower()))
            ).first()
            if target is None:
                raise NotFound("No user has this username", code="user_not_found")
            target_id = target.id  # a rollback below would expire `target`
            created = await _insert_membership(db, room_id, target_id)
            return await _membership_public(db, room_id, target_id), created

    async def remove_member(self, user_id: str, room_id: str, member_id: str) -> None:
        async with self._sessions() as db:
            owner = (await room_access(db, room_id, user_id)).owner()
            if member_id == owner.user_id:
                raise Conflict(
                    "The owner cannot leave; delete the room instead", code="owner_cannot_leave"
                )
            if not await _delete_membership(db, room_id, member_id):
                raise NotFound("This user is not a member", code="member_not_found")
            await db.commit()
        self._end_subscription(room_id, member_id, "removed")

    def _end_subscription(self, room_id: str, user_id: str, reason: str) -> None:
        self._events.publish(
            Event(
                "room.removed",
                {"room_id": room_id, "reason": reason},
                room_id=room_id,
                user_id=user_id,
            )
        )


_ROOMS = SQLModel.metadata.tables["rooms"]
_MEMBERSHIPS = SQLModel.metadata.tables["memberships"]
_USERS = SQLModel.metadata.tables["users"]
# The room's visibility, and my membership with my user (NULLs when I am not a member).
SELECT_MY_JOIN = (
    sa.select(
        _ROOMS.c.visibility,
        _MEMBERSHIPS.c.role,
        _MEMBERSHIPS.c.joined_at,
        _MEMBERSHIPS.c.last_read_seq,
        _USERS.c.username,
        _USERS.c.display_name,
    )
    .select_from(
        _ROOMS.outerjoin(
            _MEMBERSHIPS,
            sa.and_(
                _MEMBERSHIPS.c.room_id == _ROOMS.c.id,
                _MEMBERSHIPS.c.user_id == sa.bindparam("user_id"),
            ),
        ).outerjoin(_USERS, _USERS.c.id == _MEMBERSHIPS.c.user_id)
    )
    .where(_ROOMS.c.id == sa.bindparam("room_id"))
)


async def _insert_membership(db: AsyncSession, room_id: str, user_id: str) -> bool:
    """Insert a plain membership; False (and no change) when it already exists."""
    db.add(Membership(room_id=room_id, user_id=user_id, role=MEMBER))
    try:
        await db.commit()
    except IntegrityError:
        await db.rollback()  # a concurrent join got there first: same outcome
        return False
    return True


async def _delete_membership(db: AsyncSession, room_id: str, user_id: str) -> bool:
    result = await db.exec(
        delete(Membership).where(
            col(Membership.room_id) == room_id, col(Membership.user_id) == user_id
        )
    )
    return bool(result.rowcount)


async def _membership_public(db: AsyncSession, room_id: str, user_id: str) -> MembershipPublic:
    membership, user = (
        await db.exec(
            select(Membership, User)
            .join(User, col(User.id) == Membership.user_id)
            .where(col(Membership.room_id) == room_id, col(Membership.user_id) == user_id)
        )
    ).one()
    return MembershipPublic(**_membership_fields(membership, user))


def _membership_fields(membership: Membership, user: User) -> dict[str, Any]:
    return {
        "room_id": membership.room_id,
        "user": user_summary(user),
        "role": membership.role,
        "joined_at": membership.joined_at,
        "last_read_seq": membership.last_read_seq,
    }


async def _count_members(db: AsyncSession, room_id: str) -> int:
    statement = select(func.count()).where(col(Membership.room_id) == room_id)
    return int((await db.exec(statement)).one())


async def _count_unread(db: AsyncSession, access: RoomAccess) -> int:
    membership = access.member()
    conditions = _unread(access.room.id, membership.last_read_seq, membership.user_id)
    return int((await db.exec(select(func.count()).where(*conditions))).one())


def _unread(room_id: Any, last_read_seq: Any, user_id: str) -> tuple[Any, ...]:
    """What counts as unread, for one room (values) or every listed room (columns):
    live messages from others after my read cursor."""
    return (
        col(Message.room_id) == room_id,
        col(Message.seq) > last_read_seq,
        col(Message.author_id) != user_id,
        col(Message.deleted).is_(False),
    )


def _room_public(room: Room, member_count: int) -> RoomPublic:
    return RoomPublic.model_validate({**room.model_dump(), "member_count": member_count})


def _room_item(
    room: Room, membership: Membership | None, members: int, unread: int | None
) -> RoomListItem:
    return RoomListItem(
        **_room_public(room, members).model_dump(),
        role=membership.role if membership else None,
        last_seq=room.last_seq if membership else None,
        unread_count=unread if membership else None,
    )


async def _nobody_online(_room_id: str) -> set[str]:
    return set()
