"""Accounts, sessions and tokens: signup, login, refresh rotation, logout, WebSocket tickets.

A session is one login. Its refresh tokens rotate: each is single-use, and presenting a spent
one again means it leaked, so the whole session is revoked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from chat_service.clock import utcnow
from chat_service.db import HeldConnection, SessionFactory
from chat_service.domain.events import Event, EventSink
from chat_service.domain.group_commit import GroupCommit
from chat_service.errors import Conflict, Forbidden, RateLimited, Unauthorized
from chat_service.models import AuthSession, RefreshToken, User, WsTicket
from chat_service.ratelimit import RateLimiter, Rule, Usage, rate_limit_headers
from chat_service.schemas import AuthResult, UserCreate, UserPublic, UserSummary
from chat_service.schemas import WsTicket as WsTicketBody
from chat_service.security.passwords import PasswordHasher
from chat_service.security.tokens import AccessTokenCodec, TokenError, digest, new_opaque_token
from chat_service.settings import Settings

INVALID_CREDENTIALS = "Incorrect username or password"


@dataclass(frozen=True, slots=True)
class PrincipalUser:
    """The caller's account as the authentication read it: plain values, not an ORM object
    (a WebSocket holds its principal for its whole life)."""

    id: str
    username: str
    display_name: str
    created_at: datetime
    disabled: bool

    def summary(self) -> UserSummary:
        return UserSummary(id=self.id, username=self.username, display_name=self.display_name)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user behind a verified access token, and that token's session."""

    user: PrincipalUser
    session_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Outcome:
    """A result plus the rate-limit usage to report in response headers."""

    result: AuthResult
    usages: list[Usage] = field(default_factory=list)


class LoginFailed(Unauthorized):
    """Wrong password or unknown user (indistinguishable), with the rate-limit usage so far."""

    def __init__(self, usages: list[Usage]) -> None:
        super().__init__(INVALID_CREDENTIALS, code="invalid_credentials")
        self.headers.update(rate_limit_headers(usages))


class AccountService:
    def __init__(
        self,
        sessions: SessionFactory,
        token_reads: HeldConnection,
        hasher: PasswordHasher,
        codec: AccessTokenCodec,
        limiter: RateLimiter,
        events: EventSink,
        settings: Settings,
    ) -> None:
        self._sessions = sessions
        self._token_reads = token_reads
        self._events = events
        self._hasher = hasher
        self._codec = codec
        self._limiter = limiter
        self._refresh_ttl = timedelta(seconds=settings.refresh_token_ttl_s)
        self._ticket_ttl = timedelta(seconds=settings.ws_ticket_ttl_s)
        self._signup_rule = Rule.parse("signup-ip", settings.signup_ip_limit)
        self._login_ip_rule = Rule.parse("login-ip", settings.login_ip_limit)
        self._login_account_rule = Rule.parse("login-account", settings.login_account_limit)
        # Concurrent token checks share one statement: those that arrive while a read is in
        # flight, or within a few loop turns of it, go into the next one (nothing waits on a
        # timer; a lone check reads after a few turns of an idle loop, microseconds).
        self._standing_reads = GroupCommit[_TokenSubject, _StandingRow | None](
            self._read_standings, MAX_STANDING_BATCH, gather_turns=STANDING_GATHER_TURNS
        )

    async def signup(self, data: UserCreate, client_ip: str) -> Outcome:
        usage = await self._limiter.hit(self._signup_rule, client_ip)
        key = data.username.lower()
        async with self._sessions() as db:
            if await _user_by_key(db, key) is not None:
                raise Conflict("This username is taken", code="username_taken")
        password_hash = await self._hasher.hash(data.password)
        user = User(
            username=data.username,
            username_key=key,
            display_name=data.display_name or data.username,
            password_hash=password_hash,
        )
        async with self._sessions() as db:
            db.add(user)
            try:
                await db.flush()
            except IntegrityError as exc:
                raise Conflict("This username is taken", code="username_taken") from exc
            result = await self._open_session(db, user)
            await db.commit()
        return Outcome(result, [usage])

    async def login(self, username: str, password: str, client_ip: str) -> Outcome:
        """Check a password. Unknown users cost the same hash and get the same answer."""
        account = username.lower()
        usages = [
            await self._limiter.ensure_allowed(self._login_ip_rule, client_ip),
            await self._limiter.ensure_allowed(self._login_account_rule, account),
        ]
        async with self._sessions() as db:
            found = await _user_by_key(db, account)
        # No transaction stays open while the hash runs (tens of ms, seconds on a busy
        # machine at nice 19): it would hold a pooled connection, and on SQLite the write lock.
        checked_hash = found.password_hash if found else None
        verification = await self._hasher.verify(password, checked_hash)
        async with self._sessions() as db:
            user = await db.get(User, found.id) if found and verification.ok else None
            # A password changed meanwhile: the one checked is no longer the account's.
            if user is None or user.password_hash != checked_hash:
                raise LoginFailed(await self._count_failure(client_ip, account))
            if user.disabled:
                raise Forbidden("This account is disabled", code="account_disabled")
            if verification.new_hash:
                user.password_hash = verification.new_hash
                db.add(user)
            result = await self._open_session(db, user)
            await db.commit()
        return Outcome(result, usages)

    async def _count_failure(self, client_ip: str, account: str) -> list[Usage]:
        usages = []
        for rule, key in ((self._login_ip_rule, client_ip), (self._login_account_rule, account)):
            try:
                usages.append(await self._limiter.hit(rule, key))
            except RateLimited:
                # This attempt was still a plain failure; the next one is refused up front.
                usages.append(await self._limiter.usage(rule, key))
        return usages

    async def refresh(self, refresh_token: str) -> AuthResult:
        """Swap a refresh token for a new pair. A spent token revokes its whole session."""
        now = utcnow()
        async with self._sessions() as db:
            row = (
                await db.exec(
                    select(RefreshToken, AuthSession, User)
                    .join(AuthSession, col(AuthSession.id) == RefreshToken.session_id)
                    .join(User, col(User.id) == AuthSession.user_id)
                    .where(RefreshToken.token_hash == digest(refresh_token))
                )
            ).first()
            if row is None:
                raise Unauthorized("Unknown refresh token")
            token, session, user = row
            if session.revoked_at is not None:
                raise Unauthorized("This session has ended", code="session_revoked")
            if token.used_at is None and token.expires_at <= now:
                raise Unauthorized("The refresh token has expired", code="token_expired")
            if token.used_at is not None or not await _spend(db, token.id, now):
                await _revoke(db, session.id, "token_reused", now)
                await db.commit()
                self._session_ended(session.id)
                raise Unauthorized(
                    "This refresh token was already used; the session is revoked",
                    code="token_reused",
                )
            if user.disabled:
                raise Forbidden("This account is disabled", code="account_disabled")
            result = await self._issue(db, user, session.id, now)
            await db.commit()
        return result

    async def logout(self, principal: Principal, refresh_token: str) -> str:
        """Revoke the session of `refresh_token` (the caller's own); return its id."""
        async with self._sessions() as db:
            session = (
                await db.exec(
                    select(AuthSession)
                    .join(RefreshToken, col(RefreshToken.session_id) == AuthSession.id)
                    .where(RefreshToken.token_hash == digest(refresh_token))
                )
            ).first()
            if session is None or session.user_id != principal.user.id:
                raise Unauthorized("Unknown refresh token")
            await _revoke(db, session.id, "logout", utcnow())
            await db.commit()
        self._session_ended(session.id)
        return session.id

    def _session_ended(self, session_id: str) -> None:
        """Live sockets of the session close with 4401."""
        self._events.publish(Event("session.revoked", session_id=session_id))

    async def issue_ticket(self, principal: Principal) -> WsTicketBody:
        ticket = new_opaque_token()
        now = utcnow()
        async with self._sessions() as db:
            await db.exec(delete(WsTicket).where(col(WsTicket.expires_at) < now))
            db.add(
                WsTicket(
                    token_hash=digest(ticket),
                    user_id=principal.user.id,
                    session_id=principal.session_id,
                    expires_at=now + self._ticket_ttl,
                )
            )
            await db.commit()
        return WsTicketBody(ticket=ticket, expires_in=int(self._ticket_ttl.total_seconds()))

    async def redeem_ticket(self, ticket: str) -> Principal:
        """Use up a WebSocket ticket; a second use, or one after expiry, is refused."""
        async with self._sessions() as db:
            redeemed = (
                await db.exec(
                    delete(WsTicket)
                    .where(col(WsTicket.token_hash) == digest(ticket))
                    .returning(col(WsTicket.session_id), col(WsTicket.expires_at))
                )
            ).first()
            await db.commit()
            if redeemed is None or redeemed[1] <= utcnow():
                raise Unauthorized("Unknown, used or expired ticket")
            # A ticket stands in for an access token issued now, and expires like one.
            expires_at = utcnow() + timedelta(seconds=self._codec.ttl_s)
            connection = await db.connection()
            row = (await connection.execute(SESSION_STANDING, {"session_id": redeemed[0]})).first()
        return _principal(row, redeemed[0], expires_at)

    async def authenticate(self, access_token: str) -> Principal:
        """Verify an access token and that its user and session still stand.

        Every REST call and WebSocket handshake runs this, so the check is one prebuilt
        statement below the ORM, on a connection kept for these reads, in autocommit on
        Postgres (no BEGIN and ROLLBACK round trips), shared by the checks that arrive
        together. It reads the database each time: a revoked session or a disabled account is
        refused at the very next call, on every worker. (Only the token's signature is
        verified once and remembered.)"""
        try:
            claims = self._codec.decode(access_token)
        except TokenError as exc:
            if exc.expired:
                raise Unauthorized("The access token has expired", code="token_expired") from exc
            raise Unauthorized("Invalid access token") from exc
        subject = _TokenSubject(claims.session_id, claims.user_id)
        row = await self._standing_reads.enqueue(subject)
        return _principal(row, claims.session_id, claims.expires_at)

    async def _read_standings(self, subjects: list[_TokenSubject]) -> list[_StandingRow | None]:
        """One statement for a batch of token checks; each gets its session's row only if the
        session is its token's subject's."""
        session_ids = _padded(sorted({subject.session_id for subject in subjects}))
        result = await self._token_reads.all(STANDINGS, {"session_ids": session_ids})
        found: dict[str, _StandingRow] = {row[0]: tuple(row[1:]) for row in result}
        rows = [found.get(subject.session_id) for subject in subjects]
        return [
            row if row is not None and row[0] == subject.user_id else None
            for row, subject in zip(rows, subjects, strict=True)
        ]

    async def _open_session(self, db: AsyncSession, user: User) -> AuthResult:
        session = AuthSession(user_id=user.id)
        db.add(session)
        await db.flush()
        return await self._issue(db, user, session.id, utcnow())

    async def _issue(
        self, db: AsyncSession, user: User, session_id: str, now: datetime
    ) -> AuthResult:
        refresh_token = new_opaque_token()
        db.add(
            RefreshToken(
                session_id=session_id,
                token_hash=digest(refresh_token),
                created_at=now,
                expires_at=now + self._refresh_ttl,
            )
        )
        access_token, _ = self._codec.encode(user.id, session_id, now)
        return AuthResult(
            user=UserPublic.model_validate(user, from_attributes=True),
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=self._codec.ttl_s,
        )


# Below the ORM, built once: the account behind a session, if the session is not revoked.
_USERS = SQLModel.metadata.tables["users"]
_AUTH_SESSIONS = SQLModel.metadata.tables["auth_sessions"]
SESSION_STANDING = (
    sa.select(
        _USERS.c.id,
        _USERS.c.username,
        _USERS.c.display_name,
        _USERS.c.created_at,
        _USERS.c.disabled,
    )
    .select_from(_USERS.join(_AUTH_SESSIONS, _AUTH_SESSIONS.c.user_id == _USERS.c.id))
    .where(
        _AUTH_SESSIONS.c.id == sa.bindparam("session_id"),
        _AUTH_SESSIONS.c.revoked_at.is_(None),
    )
)
# Many sessions' at once, each row led by its session's id (for access tokens, whose subject
# must also be the session's user: checked on the rows).
STANDINGS = (
    sa.select(_AUTH_SESSIONS.c.id, *SESSION_STANDING.selected_columns)
    .select_from(_USERS.join(_AUTH_SESSIONS, _AUTH_SESSIONS.c.user_id == _USERS.c.id))
    .where(
        _AUTH_SESSIONS.c.id.in_(sa.bindparam("session_ids", expanding=True)),
        _AUTH_SESSIONS.c.revoked_at.is_(None),
    )
)
MAX_STANDING_BATCH = 64
# Measured with `bench connections` (10,000 handshakes, 100 in flight): 0 turns gave batches
# of 1.4 checks, 2 of 3.6, 5 of 6.6, 8 of 9-13; 5 turns gave the most handshakes/s.
STANDING_GATHER_TURNS = 5

_StandingRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _TokenSubject:
    session_id: str
    user_id: str


def _padded(ids: list[str]) -> list[str]:
    """The ids, their last repeated up to a power of two: the statement's text depends on the
    count, and a few counts keep the driver's prepared statements few."""
    size = 1 << (len(ids) - 1).bit_length()
    return ids + ids[-1:] * (size - len(ids))


def _principal(row: Sequence[Any] | None, session_id: str, expires_at: datetime) -> Principal:
    """A row of SESSION_STANDING as the caller, or why it is refused."""
    if row is None:
        raise Unauthorized("This session has ended", code="session_revoked")
    user_id, username, display_name, created_at, disabled = row
    if disabled:
        raise Forbidden("This account is disabled", code="account_disabled")
    return Principal(
        PrincipalUser(user_id, username, display_name, created_at, disabled), session_id, expires_at
    )


async def _user_by_key(db: AsyncSession, key: str) -> User | None:
    return (await db.exec(select(User).where(User.username_key == key))).first()


async def _spend(db: AsyncSession, token_id: str, now: datetime) -> bool:
    """Mark a refresh token used; False when a concurrent request spent it first."""
    result = await db.exec(
        update(RefreshToken)
        .where(col(RefreshToken.id) == token_id, col(RefreshToken.used_at).is_(None))
        .values(used_at=now)
    )
    return bool(result.rowcount == 1)


async def _revoke(db: AsyncSession, session_id: str, reason: str, now: datetime) -> None:
    await db.exec(
        update(AuthSession)
        .where(col(AuthSession.id) == session_id, col(AuthSession.revoked_at).is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
