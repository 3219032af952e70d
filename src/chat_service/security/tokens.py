"""Access tokens (JWT through python-jose) and opaque secrets (refresh tokens, tickets).

The algorithm is pinned by configuration, never read from the token header, and every claim
the service relies on is required.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from jose import ExpiredSignatureError, JWTError, jwt

ACCESS_TYPE = "access"
REQUIRED_CLAIMS = ("exp", "iat", "sub", "sid", "iss", "aud", "typ")


class TokenError(Exception):
    """The token is not acceptable; `expired` tells a stale token from a bad one."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    session_id: str
    expires_at: datetime


class AccessTokenCodec:
    def __init__(
        self, *, secret: str, algorithm: str, issuer: str, audience: str, ttl_s: int
    ) -> None:
        self._secret = secret
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self.ttl_s = ttl_s

    def encode(self, user_id: str, session_id: str, now: datetime) -> tuple[str, datetime]:
        expires_at = now + timedelta(seconds=self.ttl_s)
        claims = {
            "sub": user_id,
            "sid": session_id,
            "iat": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
            "iss": self._issuer,
            "aud": self._audience,
            "typ": ACCESS_TYPE,
        }
        token = jwt.encode(claims, self._secret, algorithm=self._algorithm)
        return token, expires_at.replace(microsecond=0)

    def decode(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={f"require_{claim}": True for claim in ("exp", "iat", "sub", "aud", "iss")},
            )
        except ExpiredSignatureError as exc:
            raise TokenError("token expired", expired=True) from exc
        except JWTError as exc:
            raise TokenError("token invalid") from exc
        missing = [claim for claim in REQUIRED_CLAIMS if claim not in claims]
        if missing:
            raise TokenError(f"token lacks claims: {', '.join(missing)}")
        if claims["typ"] != ACCESS_TYPE:
            raise TokenError("not an access token")
        if not isinstance(claims["sub"], str) or not isinstance(claims["sid"], str):
            raise TokenError("token subject is malformed")
        try:
            expires_at = datetime.fromtimestamp(claims["exp"], UTC)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TokenError("token expiry is malformed") from exc
        return AccessClaims(claims["sub"], claims["sid"], expires_at)


def new_opaque_token() -> str:
    """A random secret for refresh tokens and tickets (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What the database stores instead of an opaque token: its SHA-256, hex-encoded."""
    return hashlib.sha256(token.encode()).hexdigest()
