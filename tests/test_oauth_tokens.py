"""The token endpoint and what hangs off it: refresh rotation and reuse detection,
revocation, introspection, userinfo, deactivated users, rate limits and transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.gateway import Gateway, create_gateway
from tests.conftest import make_settings
from tests.oauth_flow import (
    bearer,
    client_credentials,
    client_credentials_response,
    create_firm,
    jwt_parts,
    login,
    refresh,
    sign_up,
)


async def _user(client: httpx.AsyncClient, email: str, **kw: Any) -> dict[str, Any]:
    await sign_up(client, email)
    return await login(client, email, **kw)


async def _integrator(
    client: httpx.AsyncClient, owner: dict[str, Any], firm_id: str, scope: str = "membership:read"
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/firms/{firm_id}/clients",
        json={"name": "Pipeline", "scope": scope},
        headers=bearer(owner),
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _userinfo_status(client: httpx.AsyncClient, tokens: dict[str, Any] | str) -> int:
    return (await client.get("/oauth/userinfo", headers=bearer(tokens))).status_code


# -- the token endpoint ----------------------------------------------------------------------
async def test_token_responses_are_never_cached(client: httpx.AsyncClient) -> None:
    await sign_up(client, "cache@example.com")
    tokens_response = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=("nobody", "x")
    )
    assert tokens_response.status_code == 401
    assert tokens_response.headers["cache-control"] == "no-store"
    assert tokens_response.headers["pragma"] == "no-cache"
    assert tokens_response.headers["www-authenticate"].startswith("Basic")
    tokens = await login(client, "cache@example.com")
    ok = await refresh(client, tokens["refresh_token"])
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "no-store"
    assert ok.headers["pragma"] == "no-cache"


async def test_oauth_errors_use_the_rfc6749_format(client: httpx.AsyncClient) -> None:
    response = await client.post("/oauth/token", data={"grant_type": "authorization_code"})
    assert response.status_code in (400, 401)
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) <= {"error", "error_description"}
    assert response.json()["error"] == "invalid_client"
    missing = await client.post("/oauth/token", data={})
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    repeated = await client.post(
        "/oauth/token", content="grant_type=refresh_token&grant_type=client_credentials",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert repeated.status_code == 400
    assert repeated.json()["error"] == "invalid_request"


async def test_password_grant_is_not_supported(client: httpx.AsyncClient) -> None:
    await sign_up(client, "pw@example.com")
    response = await client.post(
        "/oauth/token",
        data={
            "grant_type": "password",
            "username": "pw@example.com",
            "password": "correct horse battery",
            "client_id": "onecluster-web",
        },
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert "access_token" not in response.json()


async def test_public_client_cannot_use_client_credentials(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "client_id": "onecluster-web"}
    )
    assert response.status_code in (400, 401)
    assert response.json()["error"] == "invalid_client"


# -- refresh tokens ----------------------------------------------------------------------------
async def test_refresh_rotates_and_keeps_the_granted_scope(client: httpx.AsyncClient) -> None:
    first = await _user(client, "rot@example.com")
    narrowed = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": "onecluster-web",
            "scope": "openid email",
        },
    )
    assert narrowed.status_code == 200, narrowed.text
    second = narrowed.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert jwt_parts(second["access_token"])[1]["scope"] == "openid email"
    assert await _userinfo_status(client, second) == 200

    # The narrower access token leaves the grant unchanged (RFC 6749 §6).
    third = await refresh(client, second["refresh_token"])
    assert third.status_code == 200
    assert jwt_parts(third.json()["access_token"])[1]["scope"] == first["scope"]

    wider = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": third.json()["refresh_token"],
            "client_id": "onecluster-web",
            "scope": "openid nonsense:scope",
        },
    )
    assert wider.status_code == 400
    assert wider.json()["error"] == "invalid_scope"


async def test_refresh_reuse_revokes_the_whole_family(client: httpx.AsyncClient) -> None:
    first = await _user(client, "reuse@example.com")
    other_session = await login(client, "reuse@example.com")
    second = (await refresh(client, first["refresh_token"])).json()
    third = (await refresh(client, second["refresh_token"])).json()
    assert await _userinfo_status(client, third) == 200

    replay = await refresh(client, first["refresh_token"])  # already used: reuse
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"

    # The newest refresh token of the family is dead, and so are its live access tokens.
    newest = await refresh(client, third["refresh_token"])
    assert newest.status_code == 400
    assert newest.json()["error"] == "invalid_grant"
    for tokens in (first, second, third):
        response = await client.get("/oauth/userinfo", headers=bearer(tokens))
        assert response.status_code == 401
        assert "www-authenticate" in response.headers
    # Another sign-in of the same user is another family: untouched.
    assert await _userinfo_status(client, other_session) == 200
    assert (await refresh(client, other_session["refresh_token"])).status_code == 200


async def test_refresh_token_is_bound_to_its_client(client: httpx.AsyncClient) -> None:
    owner = await _user(client, "bound@example.com")
    firm = await create_firm(client, owner)
    owner = await login(client, "bound@example.com")
    integrator = await _integrator(client, owner, firm["id"])
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": owner["refresh_token"]},
        auth=(integrator["client_id"], integrator["client_secret"]),
    )
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_grant", "unauthorized_client")
    assert (await refresh(client, owner["refresh_token"])).status_code == 200


# -- revocation ------------------------------------------------------------------------------
async def test_revoking_an_access_token(client: httpx.AsyncClient) -> None:
    tokens = await _user(client, "rev@example.com")
    response = await client.post(
        "/oauth/revoke",
        data={"token": tokens["access_token"], "client_id": "onecluster-web"},
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert await _userinfo_status(client, tokens) == 401
    # The refresh token was not what was revoked: it still works.
    assert (await refresh(client, tokens["refresh_token"])).status_code == 200


async def test_revoking_a_refresh_token_ends_the_session(client: httpx.AsyncClient) -> None:
    tokens = await _user(client, "revrt@example.com")
    response = await client.post(
        "/oauth/revoke",
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": "onecluster-web",
        },
    )
    assert response.status_code == 200
    assert (await refresh(client, tokens["refresh_token"])).status_code == 400
    assert await _userinfo_status(client, tokens) == 401


async def test_revoking_unknown_or_foreign_tokens(client: httpx.AsyncClient) -> None:
    unknown = await client.post(
        "/oauth/revoke", data={"token": "not-a-token", "client_id": "onecluster-web"}
    )
    assert unknown.status_code == 200  # RFC 7009 §2.2
    owner = await _user(client, "foreign@example.com")
    firm = await create_firm(client, owner)
    owner = await login(client, "foreign@example.com")
    integrator = await _integrator(client, owner, firm["id"])
    foreign = await client.post(
        "/oauth/revoke",
        data={"token": owner["access_token"]},
        auth=(integrator["client_id"], integrator["client_secret"]),
    )
    assert foreign.status_code == 400
    assert await _userinfo_status(client, owner) == 200
    anonymous = await client.post("/oauth/revoke", data={"token": owner["access_token"]})
    assert anonymous.status_code in (400, 401)
    assert anonymous.json()["error"] == "invalid_client"


# -- introspection ---------------------------------------------------------------------------
async def _introspect(
    client: httpx.AsyncClient, creds: dict[str, Any], token: str, **extra: str
) -> httpx.Response:
    return await client.post(
        "/oauth/introspect",
        data={"token": token, **extra},
        auth=(creds["client_id"], creds["client_secret"]),
    )


async def test_introspection_rules(client: httpx.AsyncClient) -> None:
    owner = await _user(client, "intro@example.com")
    firm = await create_firm(client, owner, "Intro firm")
    owner = await login(client, "intro@example.com")
    creds = await _integrator(client, owner, firm["id"])
    own = await client_credentials(client, creds["client_id"], creds["client_secret"])

    response = await _introspect(client, creds, own["access_token"])
    assert response.status_code == 200
    body = response.json()
    assert body["active"] is True
    assert body["client_id"] == creds["client_id"]
    assert body["sub"] == creds["client_id"]
    assert body["firm_id"] == firm["id"]
    assert body["scope"] == "membership:read"
    assert body["iss"] == "http://testserver" and body["aud"] == "onecluster"
    assert body["jti"] == jwt_parts(own["access_token"])[1]["jti"]

    # A user token acting for the same firm: active, with the user as subject.
    same_firm = (await _introspect(client, creds, owner["access_token"])).json()
    assert same_firm["active"] is True
    assert same_firm["firm_id"] == firm["id"]
    assert same_firm["sub"] == jwt_parts(owner["access_token"])[1]["sub"]
    refresh_view = await _introspect(
        client, creds, owner["refresh_token"], token_type_hint="refresh_token"
    )
    assert refresh_view.json()["active"] is True
    assert refresh_view.json()["token_type"] == "refresh_token"

    # Tokens of another firm, and of no firm, are not this client's business.
    other = await _user(client, "intro-other@example.com")
    other_firm = await create_firm(client, other, "Other firm")
    assert (await _introspect(client, creds, other["access_token"])).json() == {"active": False}
    other = await login(client, "intro-other@example.com")
    assert jwt_parts(other["access_token"])[1]["firm_id"] == other_firm["id"]
    assert (await _introspect(client, creds, other["access_token"])).json() == {"active": False}

    assert (await _introspect(client, creds, "garbage")).json() == {"active": False}
    await client.post(
        "/oauth/revoke",
        data={"token": own["access_token"]},
        auth=(creds["client_id"], creds["client_secret"]),
    )
    assert (await _introspect(client, creds, own["access_token"])).json() == {"active": False}


async def test_introspection_needs_a_confidential_client(client: httpx.AsyncClient) -> None:
    tokens = await _user(client, "intro-pub@example.com")
    public = await client.post(
        "/oauth/introspect", data={"token": tokens["access_token"], "client_id": "onecluster-web"}
    )
    assert public.status_code in (400, 401)
    assert public.json()["error"] == "invalid_client"
    assert "active" not in public.json()


# -- userinfo and deactivated users -----------------------------------------------------------
async def test_userinfo_needs_the_openid_scope(client: httpx.AsyncClient) -> None:
    await sign_up(client, "ui@example.com", display_name="Ui User")
    plain = await login(client, "ui@example.com", scope="membership:read")
    response = await client.get("/oauth/userinfo", headers=bearer(plain))
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    narrow = await login(client, "ui@example.com", scope="openid profile")
    body = (await client.post("/oauth/userinfo", headers=bearer(narrow))).json()
    assert body["name"] == "Ui User"
    assert "email" not in body  # no email scope
    assert (await client.get("/oauth/userinfo")).status_code == 401


async def test_deactivated_user_loses_tokens_and_login(client: httpx.AsyncClient) -> None:
    tokens = await _user(client, "gone@example.com")
    spare = await login(client, "gone@example.com")
    deactivated = await client.post("/v1/users/me:deactivate", headers=bearer(tokens))
    assert deactivated.status_code == 200, deactivated.text
    assert await _userinfo_status(client, tokens) == 401
    assert await _userinfo_status(client, spare) == 401
    assert (await refresh(client, spare["refresh_token"])).status_code == 400
    with pytest.raises(AssertionError, match="deactivated"):
        await login(client, "gone@example.com")


async def test_denylisted_jti_is_refused(client: httpx.AsyncClient, gateway: Gateway) -> None:
    tokens = await _user(client, "deny@example.com")
    assert await _userinfo_status(client, tokens) == 200
    jti = jwt_parts(tokens["access_token"])[1]["jti"]
    await gateway.runtime.denylist.add(jti, 60)
    response = await client.get("/oauth/userinfo", headers=bearer(tokens))
    assert response.status_code == 401
    assert "invalid_token" in response.headers["www-authenticate"]


# -- rate limits and transport --------------------------------------------------------------
@pytest.fixture
async def limited(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        tmp_path,
        database_url,
        redis_prefix,
        token_rate_limit_per_minute=3,
        login_rate_limit_per_minute=2,
    )
    gw = create_gateway(settings)
    async with gw.lifespan():
        transport = httpx.ASGITransport(app=gw)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def test_token_endpoint_rate_limit(limited: httpx.AsyncClient) -> None:
    async def attempt(client_id: str) -> httpx.Response:
        return await limited.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, "bad")
        )

    # A fixed 60 s window: the first 3 can never be over the limit, and 7 attempts hold
    # at least 4 inside one window even if a window boundary falls among them.
    results = [await attempt("cli_flood") for _ in range(7)]
    assert all(r.status_code == 401 for r in results[:3])
    throttled = [r for r in results if r.status_code == 429]
    assert throttled
    for response in throttled:
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"].startswith("application/problem+json")
    # Another client has its own budget.
    assert (await attempt("cli_other")).status_code == 401


async def test_login_rate_limit(limited: httpx.AsyncClient) -> None:
    from tests.oauth_flow import parse_form, pkce_pair

    await sign_up(limited, "slow@example.com")
    _, challenge = pkce_pair()
    page = await limited.get(
        "/oauth/authorize",
        params={
            "response_type": "code",
            "client_id": "onecluster-web",
            "redirect_uri": "http://testserver/cb",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    action, fields = parse_form(page.text)
    fields.update(email="slow@example.com", password="wrong password!")
    statuses = []
    for _ in range(5):
        response = await limited.post(action, data=fields)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "Too many sign-in attempts" in response.text
    assert statuses[:2] == [200, 200]
    assert 429 in statuses


async def test_plain_http_refused_outside_development(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        redis_prefix,
        env="production",
        public_url="https://id.example.cn",
        secret_key="a-real-secret-for-this-test-only-0123456789",
    )
    gw = create_gateway(settings)
    async with gw.lifespan():
        transport = httpx.ASGITransport(app=gw)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            response = await c.post("/oauth/token", data={"grant_type": "client_credentials"})
            assert response.status_code == 400
            assert response.json()["error"] == "insecure_transport"
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            response = await c.post("/oauth/token", data={"grant_type": "password"})
            assert response.status_code == 400
            assert response.json()["error"] == "unsupported_grant_type"


async def test_token_issued_while_the_key_cache_reloads(client: httpx.AsyncClient, gateway) -> None:
    """A stale key cache is reloaded inside the grant's transaction without locking itself.

    On SQLite the grant's session holds the write lock; the reload used to open a second
    writing session on the same thread and wait 30 s for it, then fail with 500.
    """
    await sign_up(client, "cache@example.com")
    owner = await login(client, "cache@example.com")
    firm = await create_firm(client, owner)
    owner = await login(client, "cache@example.com", firm_id=firm["id"])
    made = await client.post(
        f"/v1/firms/{firm['id']}/clients",
        json={"name": "cache", "scope": "membership:read"},
        headers=bearer(owner),
    )
    client_id, secret = made.json()["client_id"], made.json()["client_secret"]
    assert (await client_credentials_response(client, client_id, secret)).status_code == 200
    gateway.apps["membership"].state.keystore.invalidate()
    again = await asyncio.wait_for(client_credentials_response(client, client_id, secret), 10)
    assert again.status_code == 200, again.text
