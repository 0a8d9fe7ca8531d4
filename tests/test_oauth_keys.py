"""Discovery documents, the JWKS, key rotation, and forged or broken tokens.

Every forgery is checked against a control: a token built by the same helper with the
real key and correct claims must be accepted, so a 401 means the forged detail was
noticed, not that the helper is broken.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc import jwt
from joserfc.jwk import RSAKey
from typer.testing import CliRunner

from api.cli import cli
from api.gateway import Gateway, create_gateway
from services.kit.db import utcnow
from services.kit.settings import Settings
from services.membership.keys import KeyStore
from services.membership.models import SigningKey
from tests.conftest import make_settings
from tests.oauth_flow import bearer, jwt_parts, login, sign_up

PROTECTED = "/oauth/userinfo"


def _keys(gateway: Gateway) -> KeyStore:
    keys: KeyStore = gateway.apps["membership"].state.keystore
    return keys


# -- discovery ---------------------------------------------------------------------------------
async def test_discovery_documents(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    oidc = await client.get("/.well-known/openid-configuration")
    oauth = await client.get("/.well-known/oauth-authorization-server")
    assert oidc.status_code == oauth.status_code == 200
    assert oidc.json() == oauth.json()
    doc = oidc.json()
    assert doc["issuer"] == "http://testserver"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "password" not in doc["grant_types_supported"]
    assert set(doc["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
    }
    assert {"client_secret_basic", "client_secret_post"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )
    for name in (
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "revocation_endpoint",
        "introspection_endpoint",
        "userinfo_endpoint",
    ):
        assert doc[name].startswith("http://testserver/"), name
        path = doc[name].removeprefix("http://testserver")
        assert (await client.options(path)).status_code != 404, name
    assert "membership:write" in doc["scopes_supported"]
    # Authlib's own validator of OpenID provider metadata agrees (http allowed in tests).
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    OpenIDProviderMetadata(doc).validate()


async def test_jwks_has_public_keys_only(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 1
    key = keys[0]
    assert key["kid"] and key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert {"n", "e"} <= set(key)
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
    assert len(base64.urlsafe_b64decode(key["n"] + "==")) * 8 == 2048


# -- rotation ------------------------------------------------------------------------------
async def test_keys_rotate_keeps_old_tokens_valid(
    client: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await sign_up(client, "rotate@example.com")
    before = await login(client, "rotate@example.com")
    old_kid = jwt_parts(before["access_token"])[0]["kid"]

    env = {
        "ONECLUSTER_DATA_DIR": str(settings.data_dir),
        "ONECLUSTER_ENV": "test",
        "ONECLUSTER_SECRET_KEY": settings.secret_key.get_secret_value(),
    }
    if settings.database_url:
        env["ONECLUSTER_DATABASE_URL"] = settings.database_url
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["keys", "rotate"], env=env)
    assert result.exit_code == 0, result.output
    new_kid = result.output.strip().rsplit(" ", 1)[-1]
    assert new_kid and new_kid != old_kid

    # The running server picks the new key up at its next reload (every 30 s).
    _keys(gateway).invalidate()
    published = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert published == {old_kid, new_kid}

    after = await login(client, "rotate@example.com")
    assert jwt_parts(after["access_token"])[0]["kid"] == new_kid
    assert (await client.get(PROTECTED, headers=bearer(after))).status_code == 200
    assert (await client.get(PROTECTED, headers=bearer(before))).status_code == 200

    db = gateway.apps["membership"].state.db
    async with db.session_scope() as session:
        old = await session.get(SigningKey, old_kid)
        assert old is not None and old.retired_at is not None and old.drop_after is not None
        kept = old.drop_after - old.retired_at
        assert kept == timedelta(
            seconds=max(settings.access_token_ttl, settings.signing_key_retention)
        )
        # Once its tokens are past expiry the old key leaves the JWKS.
        old.drop_after = utcnow() - timedelta(seconds=1)
    _keys(gateway).invalidate()
    published = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert published == {new_kid}


async def test_signing_does_not_read_the_database_per_token(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    keys = _keys(gateway)
    await keys.signing_key()
    engine = gateway.apps["membership"].state.db.sync_engine
    seen: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", spy)
    try:
        await sign_up(client, "cached@example.com")
        await login(client, "cached@example.com")
    finally:
        sa.event.remove(engine, "before_cursor_execute", spy)
    assert seen  # the grant did use the database …
    assert not [s for s in seen if "signing_keys" in s]  # … but not for the key


# -- forged and broken tokens ----------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def _claims(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    user = await sign_up(client, f"forge{time.time_ns()}@example.com")
    claims: dict[str, Any] = {
        "iss": "http://testserver",
        "aud": "onecluster",
        "sub": user["id"],
        "client_id": "onecluster-web",
        "scope": "openid",
        "jti": f"jti_forged{time.time_ns()}",
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return claims


async def _signed(gateway: Gateway, claims: dict[str, Any], **header: Any) -> str:
    kid, key = await _keys(gateway).signing_key()
    head = {"alg": "RS256", "typ": "at+jwt", "kid": kid, **header}
    return jwt.encode(head, claims, key)


async def _assert_refused(client: httpx.AsyncClient, token: str, why: str) -> None:
    response = await client.get(PROTECTED, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, f"{why}: {response.status_code} {response.text}"
    assert response.headers["www-authenticate"].startswith("Bearer"), why
    assert response.headers["content-type"].startswith("application/problem+json"), why


async def test_control_token_from_the_forging_helper_is_accepted(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    token = await _signed(gateway, await _claims(client))
    response = await client.get(PROTECTED, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


async def test_forged_and_broken_tokens_get_401(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    now = int(time.time())
    good = await _signed(gateway, await _claims(client))
    head, body, signature = good.split(".")
    forged_claims = jwt_parts(good)[1] | {"sub": "usr_someone_else"}
    public_pem = RSAKey.import_key((await client.get("/.well-known/jwks.json")).json()["keys"][0])
    pem = public_pem.as_pem(private=False)

    cases: dict[str, str] = {
        "expired": await _signed(gateway, await _claims(client, iat=now - 900, exp=now - 300)),
        "wrong aud": await _signed(gateway, await _claims(client, aud="someone-else")),
        "wrong iss": await _signed(gateway, await _claims(client, iss="https://evil.example")),
        "not an access token (typ)": await _signed(gateway, await _claims(client), typ="JWT"),
        "unknown kid": await _signed(gateway, await _claims(client), kid="no-such-key"),
        "tampered signature": f"{head}.{body}.{signature[:-6]}AAAAAA",
        "tampered claims": f"{head}.{_b64(json.dumps(forged_claims).encode())}.{signature}",
        "garbage": "garbage",
        "three dots of garbage": "a.b.c",
        "empty segments": "..",
    }
    none_header = _b64(b'{"alg":"none","typ":"at+jwt","kid":"x"}')
    cases["alg none"] = f"{none_header}.{body}."
    # HS256 keyed with the public key's PEM: the classic algorithm-confusion forgery.
    # (joserfc refuses to build it, so it is built by hand.)
    hs_header = _b64(json.dumps(jwt_parts(good)[0] | {"alg": "HS256"}).encode())
    mac = hmac.new(pem, f"{hs_header}.{body}".encode(), hashlib.sha256).digest()
    cases["HS256 with the public PEM"] = f"{hs_header}.{body}.{_b64(mac)}"
    for why, token in cases.items():
        await _assert_refused(client, token, why)


async def test_missing_or_wrong_scheme_gets_401(client: httpx.AsyncClient) -> None:
    await sign_up(client, "scheme@example.com")
    tokens = await login(client, "scheme@example.com")
    for headers in (
        {},
        {"Authorization": tokens["access_token"]},
        {"Authorization": f"Basic {tokens['access_token']}"},
        {"Authorization": "Bearer "},
    ):
        response = await client.get(PROTECTED, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
    firm_route = await client.get("/v1/firms/firm_x/clients", headers={"Authorization": "Bearer x"})
    assert firm_route.status_code == 401


def test_rotate_creates_the_database_when_missing(tmp_path: Path) -> None:
    from services.membership.keys import rotate_signing_key

    settings = Settings(env="test", secret_key="k" * 32, data_dir=tmp_path / "fresh")
    first = rotate_signing_key(settings)
    second = rotate_signing_key(settings)
    assert first != second
    assert (tmp_path / "fresh" / "membership.sqlite3").exists()


def test_sync_key_store_api(tmp_path: Path) -> None:
    from services.kit.db import Database
    from services.membership.keys import MIGRATIONS_DIR

    settings = Settings(env="test", secret_key="k" * 32, data_dir=tmp_path)
    db = Database(settings.database_url_for("membership"), schema="membership")
    db.migrate_sync(MIGRATIONS_DIR)
    try:
        keys = KeyStore(db, settings)
        kid = keys.ensure_active_key_sync()
        assert keys.ensure_active_key_sync() == kid  # one active key, not one per call
        signing_kid, private = keys.signing_key_sync()
        assert signing_kid == kid and private.is_private
        assert [k["kid"] for k in keys.public_jwks_sync()["keys"]] == [kid]
        assert [k.kid for k in keys.verification_key_set_sync().keys] == [kid]
    finally:
        db.sync_engine.dispose()


async def test_expired_token_records_are_purged_while_running(
    tmp_path: Path, database_url: str | None, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.membership import oauth_routes
    from services.membership.models import AccessToken

    monkeypatch.setattr(oauth_routes, "HOUSEKEEPING_INTERVAL", 0.05)
    gateway = create_gateway(make_settings(tmp_path, database_url, redis_prefix))
    async with gateway.lifespan():
        db = gateway.apps["membership"].state.db
        now = utcnow()
        async with db.session_scope() as session:
            for jti, expires in (
                ("jti_old", now - timedelta(minutes=5)),
                ("jti_live", now + timedelta(minutes=5)),
            ):
                session.add(
                    AccessToken(jti=jti, client_id="c", subject="s", scope="", expires_at=expires)
                )
        for _ in range(100):
            async with db.read_scope() as session:
                left = {t.jti for t in (await session.execute(sa.select(AccessToken))).scalars()}
            if "jti_old" not in left:
                break
            await asyncio.sleep(0.05)
        assert left == {"jti_live"}
    assert gateway.apps["membership"].state.housekeeping.cancelled()
