"""Access tokens (JWT through python-jose) and opaque secrets (refresh tokens, tickets).

The algorithm is pinned by configuration, never read from the token header, and every claim
the service relies on is required.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from jose import ExpiredSignatureError, JWTError, jwk, jwt

ACCESS_TYPE = "access"
REQUIRED_CLAIMS = ("exp", "iat", "sub", "sid", "iss", "aud", "typ")
# Tokens verified lately, kept with their claims: a client presents the same token on every
# call and socket for its whole lifetime. About 0.5 KiB each.
VERIFIED_TOKENS_KEPT = 4096


class TokenError(Exception):
    """The token is not acceptable; `expired` tells a stale token from a bad one."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str
    expires_at: datetime
    expiry_s: int  # `exp` as signed


class AccessTokenCodec:
    def __init__(
        self,
        *,
        secret: str,
        algorithm: str,
        issuer: str,
        audience: str,
        ttl_s: int,
        verified_kept: int = VERIFIED_TOKENS_KEPT,
    ) -> None:
        # Built once: python-jose otherwise tries the secret as JSON and builds a key object
        # from it on every call (a third of a decode's time).
        self._key = jwk.construct(secret, algorithm)
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self.ttl_s = ttl_s
        self._verified: dict[str, AccessClaims] = {}
        self._verified_kept = verified_kept

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
        token = jwt.encode(claims, self._key, algorithm=self._algorithm)
        return token, expires_at.replace(microsecond=0)

    def decode(self, token: str) -> AccessClaims:
        """The claims of a valid access token. A token verified before is not verified again:
        only the exact string that passed is found, and its expiry is checked every time."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= self._verified_kept:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = claims
        elif claims.expiry_s < epoch_s():  # as python-jose judges `exp`, to the second
            del self._verified[token]
            raise TokenError("token expired", expired=True)
        return claims

    def _verify(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._key,
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
            expiry_s = int(claims["exp"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise TokenError("token expiry is malformed") from exc
        return AccessClaims(claims["sub"], claims["sid"], expires_at, expiry_s)


def epoch_s() -> int:
    return int(time.time())


def new_opaque_token() -> str:
    """A random secret for refresh tokens and tickets (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What the database stores instead of an opaque token: its SHA-256, hex-encoded."""
    return hashlib.sha256(token.encode()).hexdigest()
