"""Access-token attacks (codec level and through GET /users/me), and opaque tokens at rest."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from jose import jwt
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from chat_service.security import tokens
from chat_service.security.tokens import (
    REQUIRED_CLAIMS,
    AccessTokenCodec,
    TokenError,
    digest,
    new_opaque_token,
)
from tests.conftest import AppFactory, client_for
from tests.helpers import API, TEST_JWT_SECRET, bearer, signup

ISSUER = AUDIENCE = "chat-service"
OTHER_SECRET = "another-secret-" + "y" * 40
ME = f"{API}/users/me"
INVALID = {"detail": "Invalid access token", "code": "invalid_token"}
EXPIRED = {"detail": "The access token has expired", "code": "token_expired"}
REVOKED = {"detail": "This session has ended", "code": "session_revoked"}


# --- building tokens by hand ------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_for(user_id: str = "u1", session_id: str = "s1", **overrides: Any) -> dict[str, Any]:
    """A complete, valid claim set; `overrides` replace claims, a value of None removes one."""
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": user_id,
        "sid": session_id,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=15)).timestamp()),
        "iss": ISSUER,
        "aud": AUDIENCE,
        "typ": "access",
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def forge(claims: dict[str, Any], secret: str = TEST_JWT_SECRET, algorithm: str = "HS256") -> str:
    return str(jwt.encode(claims, secret, algorithm=algorithm))


def unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token: header and payload, empty signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}."


def with_payload(token: str, **changes: Any) -> str:
    """The same header and signature around a modified payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(unb64url(payload))
    claims.update(changes)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def with_flipped_signature(token: str) -> str:
    """Flip one bit of the decoded signature (editing a base64 character may only touch padding)."""
    header, payload, signature = token.split(".")
    raw = bytearray(unb64url(signature))
    raw[0] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def codec(algorithm: str = "HS256", secret: str = TEST_JWT_SECRET) -> AccessTokenCodec:
    return AccessTokenCodec(
        secret=secret, algorithm=algorithm, issuer=ISSUER, audience=AUDIENCE, ttl_s=900
    )


def expect_invalid(token: str, algorithm: str = "HS256") -> TokenError:
    with pytest.raises(TokenError) as caught:
        codec(algorithm).decode(token)
    assert caught.value.expired is False, caught.value
    return caught.value


# --- codec level ------------------------------------------------------------------------------


def test_codec_round_trip() -> None:
    now = datetime.now(UTC)
    token, expires_at = codec().encode("user-1", "session-1", now)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.get_unverified_claims(token)
    assert set(claims) == set(REQUIRED_CLAIMS)
    assert claims["typ"] == "access"
    assert (claims["iss"], claims["aud"]) == (ISSUER, AUDIENCE)
    assert claims["exp"] - claims["iat"] == 900
    decoded = codec().decode(token)
    assert (decoded.user_id, decoded.session_id) == ("user-1", "session-1")
    assert decoded.expires_at == expires_at == (now + timedelta(seconds=900)).replace(microsecond=0)


def test_codec_accepts_a_hand_made_valid_token() -> None:
    """The forging helpers make acceptable tokens, so each rejection below is the attack's doing."""
    decoded = codec().decode(forge(claims_for("user-1", "session-1")))
    assert (decoded.user_id, decoded.session_id) == ("user-1", "session-1")


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token python-jose verifies from here on."""
    verified: list[str] = []
    verify = tokens.jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        verified.append(token)
        return verify(token, *args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting)
    return verified


def test_a_verified_token_is_kept_and_its_expiry_still_checked(
    verifications: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = codec()
    token, _ = kept.encode("user-1", "session-1", datetime.now(UTC))
    first, second = kept.decode(token), kept.decode(token)
    assert first == second
    assert verifications == [token]  # verified once
    monkeypatch.setattr(tokens, "epoch_s", lambda: first.expiry_s)
    assert kept.decode(token) == first  # `exp` itself is still valid, as python-jose has it
    monkeypatch.setattr(tokens, "epoch_s", lambda: first.expiry_s + 1)
    with pytest.raises(TokenError) as caught:
        kept.decode(token)
    assert caught.value.expired is True


def test_a_kept_token_does_not_vouch_for_a_tampered_copy() -> None:
    kept = codec()
    token, _ = kept.encode("user-1", "session-1", datetime.now(UTC))
    kept.decode(token)
    for tampered in (with_payload(token, sub="user-2"), with_flipped_signature(token)):
        with pytest.raises(TokenError):
            kept.decode(tampered)
    assert kept.decode(token).user_id == "user-1"


def test_the_kept_tokens_are_bounded_and_the_oldest_goes_first(verifications: list[str]) -> None:
    kept = AccessTokenCodec(
        secret=TEST_JWT_SECRET,
        algorithm="HS256",
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_s=900,
        verified_kept=2,
    )
    now = datetime.now(UTC)
    first, second, third = (kept.encode("user-1", f"session-{n}", now)[0] for n in range(3))
    for token in (first, second, third, third, second):
        kept.decode(token)
    assert verifications == [first, second, third]
    kept.decode(first)  # pushed out by the third
    assert verifications == [first, second, third, first]


def test_codec_rejects_tampered_payload() -> None:
    token, _ = codec().encode("user-1", "session-1", datetime.now(UTC))
    expect_invalid(with_payload(token, sub="user-2"))


def test_codec_rejects_tampered_signature() -> None:
    token, _ = codec().encode("user-1", "session-1", datetime.now(UTC))
    expect_invalid(with_flipped_signature(token))


def test_codec_rejects_alg_none() -> None:
    expect_invalid(unsigned(claims_for()))


@pytest.mark.parametrize(
    ("pinned", "signed_with"),
    [("HS256", "HS512"), ("HS256", "HS384"), ("HS512", "HS256"), ("HS384", "HS512")],
)
def test_codec_rejects_other_algorithm_with_same_secret(pinned: str, signed_with: str) -> None:
    token = forge(claims_for(), algorithm=signed_with)
    expect_invalid(token, algorithm=pinned)
    # Signed with the pinned algorithm, the same claims pass: only the algorithm differs.
    assert codec(pinned).decode(forge(claims_for(), algorithm=pinned)).user_id == "u1"


def test_codec_rejects_other_secret() -> None:
    expect_invalid(forge(claims_for(), secret=OTHER_SECRET))


def test_codec_reports_expiry() -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    token = forge(
        claims_for(iat=int((past - timedelta(minutes=15)).timestamp()), exp=int(past.timestamp()))
    )
    with pytest.raises(TokenError) as caught:
        codec().decode(token)
    assert caught.value.expired is True


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "another-service"},
        {"iss": "someone-else"},
        {"typ": "refresh"},
        {"sub": 12345},
        {"sid": 12345},
        {"sid": ["s1"]},
    ],
    ids=["aud", "iss", "typ", "sub-int", "sid-int", "sid-list"],
)
def test_codec_rejects_wrong_claims(changes: dict[str, Any]) -> None:
    expect_invalid(forge(claims_for(**changes)))


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_codec_rejects_missing_claim(claim: str) -> None:
    claims = claims_for(**{claim: None})
    assert claim not in claims
    expect_invalid(forge(claims))


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "..."])
def test_codec_rejects_garbage(token: str) -> None:
    expect_invalid(token)


# --- end to end through GET /users/me ---------------------------------------------------------


async def account(client: httpx.AsyncClient, username: str) -> tuple[dict[str, Any], str, str]:
    """Sign up; return the auth body, the user id and the session id of its access token."""
    body = await signup(client, username)
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["sub"] == body["user"]["id"]
    return body, body["user"]["id"], claims["sid"]


async def assert_refused(
    client: httpx.AsyncClient, headers: dict[str, str], expected: dict[str, str]
) -> None:
    response = await client.get(ME, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json() == expected
    assert response.headers["www-authenticate"] == "Bearer"


async def test_valid_token_accepted(client: httpx.AsyncClient) -> None:
    body, user_id, session_id = await account(client, "alice")
    response = await client.get(ME, headers=bearer(body["access_token"]))
    assert response.status_code == 200, response.text
    me = response.json()
    assert me["id"] == user_id
    assert (me["username"], me["display_name"]) == ("alice", "alice")
    # A token made by hand with the same claims works too: the forging helper is faithful.
    forged = forge(claims_for(user_id, session_id))
    response = await client.get(ME, headers=bearer(forged))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == user_id


async def test_tampered_payload_refused(client: httpx.AsyncClient) -> None:
    alice, _, _ = await account(client, "alice")
    _, bob_id, _ = await account(client, "bob")
    await assert_refused(client, bearer(with_payload(alice["access_token"], sub=bob_id)), INVALID)


async def test_tampered_signature_refused(client: httpx.AsyncClient) -> None:
    body, _, _ = await account(client, "alice")
    await assert_refused(client, bearer(with_flipped_signature(body["access_token"])), INVALID)


async def test_alg_none_refused(client: httpx.AsyncClient) -> None:
    _, user_id, session_id = await account(client, "alice")
    await assert_refused(client, bearer(unsigned(claims_for(user_id, session_id))), INVALID)


@pytest.mark.parametrize("algorithm", ["HS512", "HS384"])
async def test_other_algorithm_same_secret_refused(
    client: httpx.AsyncClient, algorithm: str
) -> None:
    _, user_id, session_id = await account(client, "alice")
    token = forge(claims_for(user_id, session_id), algorithm=algorithm)
    await assert_refused(client, bearer(token), INVALID)


async def test_configured_algorithm_is_the_only_one(app_factory: AppFactory) -> None:
    """With HS512 configured, tokens are HS512 and an HS256 token with the same secret fails."""
    app = await app_factory(jwt_algorithm="HS512")
    async with client_for(app) as client:
        body, user_id, session_id = await account(client, "alice")
        assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS512"
        response = await client.get(ME, headers=bearer(body["access_token"]))
        assert response.status_code == 200, response.text
        token = forge(claims_for(user_id, session_id), algorithm="HS256")
        await assert_refused(client, bearer(token), INVALID)


async def test_other_secret_refused(client: httpx.AsyncClient) -> None:
    _, user_id, session_id = await account(client, "alice")
    token = forge(claims_for(user_id, session_id), secret=OTHER_SECRET)
    await assert_refused(client, bearer(token), INVALID)


async def test_expired_token_refused(client: httpx.AsyncClient) -> None:
    _, user_id, session_id = await account(client, "alice")
    past = datetime.now(UTC) - timedelta(seconds=30)
    token = forge(
        claims_for(
            user_id,
            session_id,
            iat=int((past - timedelta(minutes=15)).timestamp()),
            exp=int(past.timestamp()),
        )
    )
    await assert_refused(client, bearer(token), EXPIRED)


@pytest.mark.parametrize(
    "changes",
    [{"aud": "another-service"}, {"iss": "someone-else"}, {"typ": "refresh"}],
    ids=["aud", "iss", "typ"],
)
async def test_wrong_claim_refused(client: httpx.AsyncClient, changes: dict[str, Any]) -> None:
    _, user_id, session_id = await account(client, "alice")
    token = forge(claims_for(user_id, session_id, **changes))
    await assert_refused(client, bearer(token), INVALID)


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
async def test_missing_claim_refused(client: httpx.AsyncClient, claim: str) -> None:
    _, user_id, session_id = await account(client, "alice")
    claims = claims_for(user_id, session_id, **{claim: None})
    assert claim not in claims
    await assert_refused(client, bearer(forge(claims)), INVALID)


@pytest.mark.parametrize("claim", ["sub", "sid"])
@pytest.mark.parametrize("kind", ["int", "list", "object"])
async def test_non_string_subject_refused(client: httpx.AsyncClient, claim: str, kind: str) -> None:
    _, user_id, session_id = await account(client, "alice")
    real = user_id if claim == "sub" else session_id
    value: Any = {"int": 42, "list": [real], "object": {"id": real}}[kind]
    token = forge(claims_for(user_id, session_id, **{claim: value}))
    await assert_refused(client, bearer(token), INVALID)


async def test_token_of_revoked_session_refused(client: httpx.AsyncClient) -> None:
    body, _, _ = await account(client, "alice")
    headers = bearer(body["access_token"])
    assert (await client.get(ME, headers=headers)).status_code == 200
    response = await client.post(
        f"{API}/auth/logout", json={"refresh_token": body["refresh_token"]}, headers=headers
    )
    assert response.status_code == 204, response.text
    await assert_refused(client, headers, REVOKED)


async def test_token_of_other_session_survives_logout(client: httpx.AsyncClient) -> None:
    """Logout ends one session, not every session of the user."""
    first, _, _ = await account(client, "alice")
    login = await client.post(
        f"{API}/auth/login", json={"username": "alice", "password": "correct horse battery staple"}
    )
    assert login.status_code == 200, login.text
    second = login.json()
    response = await client.post(
        f"{API}/auth/logout",
        json={"refresh_token": first["refresh_token"]},
        headers=bearer(first["access_token"]),
    )
    assert response.status_code == 204, response.text
    await assert_refused(client, bearer(first["access_token"]), REVOKED)
    response = await client.get(ME, headers=bearer(second["access_token"]))
    assert response.status_code == 200, response.text


async def test_token_of_deleted_user_refused(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    body, user_id, _ = await account(client, "alice")
    headers = bearer(body["access_token"])
    assert (await client.get(ME, headers=headers)).status_code == 200
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # The schema's ON DELETE CASCADE only acts with SQLite's foreign keys switched on.
            await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        await connection.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": user_id})
        await connection.commit()
        sessions = await connection.scalar(
            sa.text("SELECT count(*) FROM auth_sessions WHERE user_id = :id"), {"id": user_id}
        )
        tokens = await connection.scalar(sa.text("SELECT count(*) FROM refresh_tokens"))
    assert (sessions, tokens) == (0, 0)
    await assert_refused(client, headers, REVOKED)


async def test_missing_authorization_header(client: httpx.AsyncClient) -> None:
    await assert_refused(
        client, {}, {"detail": "Missing bearer token", "code": "not_authenticated"}
    )


async def test_other_scheme_is_not_authentication(client: httpx.AsyncClient) -> None:
    body, _, _ = await account(client, "alice")
    headers = {"Authorization": f"Basic {body['access_token']}"}
    await assert_refused(
        client, headers, {"detail": "Missing bearer token", "code": "not_authenticated"}
    )


@pytest.mark.parametrize(
    "value", ["Bearer garbage", "Bearer a.b.c", "Bearer ...", "Bearer eyJhbGciOiJIUzI1NiJ9"]
)
async def test_bearer_garbage(client: httpx.AsyncClient, value: str) -> None:
    await assert_refused(client, {"Authorization": value}, INVALID)


async def test_access_token_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    body, _, _ = await account(client, "alice")
    response = await client.post(
        f"{API}/auth/refresh", json={"refresh_token": body["access_token"]}
    )
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": "Unknown refresh token", "code": "invalid_token"}
    # The real refresh token still works: the refusal was about the kind of token.
    response = await client.post(
        f"{API}/auth/refresh", json={"refresh_token": body["refresh_token"]}
    )
    assert response.status_code == 200, response.text


async def test_jwt_shaped_string_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    """A signed JWT short enough to pass the length check is looked up, and is unknown."""
    _, user_id, _ = await account(client, "alice")
    token = forge({"sub": user_id, "typ": "refresh"})
    assert token.count(".") == 2
    assert len(token) < 256
    response = await client.post(f"{API}/auth/refresh", json={"refresh_token": token})
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": "Unknown refresh token", "code": "invalid_token"}


async def test_refresh_token_is_not_an_access_token(client: httpx.AsyncClient) -> None:
    body, _, _ = await account(client, "alice")
    await assert_refused(client, bearer(body["refresh_token"]), INVALID)


# --- opaque tokens ----------------------------------------------------------------------------


def test_digest_is_sha256_hex() -> None:
    assert digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    token = new_opaque_token()
    assert digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert len(digest(token)) == 64


def test_opaque_tokens_are_long_random_and_url_safe() -> None:
    tokens = {new_opaque_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(unb64url(token)) >= 32
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


async def all_rows(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    async with engine.connect() as connection:
        return {
            table.name: [tuple(row) for row in await connection.execute(sa.select(table))]
            for table in SQLModel.metadata.sorted_tables
        }


async def test_refresh_tokens_and_tickets_stored_hashed(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    body, _, _ = await account(client, "alice")
    refreshed = await client.post(
        f"{API}/auth/refresh", json={"refresh_token": body["refresh_token"]}
    )
    assert refreshed.status_code == 200, refreshed.text
    pair = refreshed.json()
    response = await client.post(f"{API}/auth/ws-ticket", headers=bearer(pair["access_token"]))
    assert response.status_code == 200, response.text
    ticket = response.json()["ticket"]
    assert response.json()["expires_in"] == 30
    secrets_given = [body["refresh_token"], pair["refresh_token"], ticket]

    async with engine.connect() as connection:
        refresh_hashes = set(
            (await connection.execute(sa.text("SELECT token_hash FROM refresh_tokens"))).scalars()
        )
        ticket_hashes = set(
            (await connection.execute(sa.text("SELECT token_hash FROM ws_tickets"))).scalars()
        )
    assert refresh_hashes == {digest(body["refresh_token"]), digest(pair["refresh_token"])}
    assert ticket_hashes == {digest(ticket)}

    rows = await all_rows(engine)
    assert rows["refresh_tokens"]
    assert rows["ws_tickets"]
    dump = repr(rows)
    for secret in secrets_given:
        assert secret not in dump
