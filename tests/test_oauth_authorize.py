"""The authorization endpoint and the authorization-code grant: login page, PKCE,
redirect URIs, code replay and the firm a user's token acts for."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import sqlalchemy as sa

from api.gateway import Gateway
from services.membership.models import AuditEvent, FirmMember
from tests.oauth_flow import (
    authorize_code,
    bearer,
    create_firm,
    exchange_code,
    jwt_parts,
    login,
    parse_form,
    pkce_pair,
    query_of,
    refresh,
    sign_up,
)

REDIRECT = "http://testserver/cb"


def _authorize_params(**overrides: str | None) -> dict[str, str]:
    _, challenge = pkce_pair()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "onecluster-web",
        "redirect_uri": REDIRECT,
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


async def test_full_code_flow_issues_rfc9068_token(client: httpx.AsyncClient) -> None:
    user = await sign_up(client, "ada@example.com")
    tokens = await login(client, "ada@example.com")

    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 600
    assert tokens["refresh_token"]
    header, claims = jwt_parts(tokens["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    assert header["kid"]
    assert claims["iss"] == "http://testserver"
    assert claims["aud"] == "onecluster"
    assert claims["sub"] == user["id"]
    assert isinstance(claims["sub"], str)
    assert claims["client_id"] == "onecluster-web"
    assert claims["jti"].startswith("jti_")
    assert claims["exp"] - claims["iat"] == 600  # our TTL, not Authlib's ten days
    assert abs(claims["auth_time"] - time.time()) < 60
    assert "firm_id" not in claims  # no firm yet
    assert "openid" in claims["scope"].split()

    info = await client.get("/oauth/userinfo", headers=bearer(tokens))
    assert info.status_code == 200, info.text
    assert info.json()["sub"] == user["id"]
    assert info.json()["email"] == "ada@example.com"
    assert info.json()["email_verified"] is False
    me = await client.get("/v1/users/me", headers=bearer(tokens))
    assert me.status_code == 200, me.text


async def test_login_page_is_a_safe_form(client: httpx.AsyncClient) -> None:
    page = await client.get("/oauth/authorize", params=_authorize_params(scope="openid email"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "oc_login" in page.headers.get("set-cookie", "")
    assert "httponly" in page.headers["set-cookie"].lower()
    action, fields = parse_form(page.text)
    assert action == "/oauth/authorize"
    assert fields["csrf_token"]
    assert fields["state"] == "st-123"
    assert set(fields) >= {"email", "password", "client_id", "redirect_uri", "code_challenge"}
    assert "<code>email</code>" in page.text and "<code>openid</code>" in page.text
    assert "membership:write" not in page.text  # only the requested scopes are listed


async def test_state_is_escaped_in_the_form(client: httpx.AsyncClient) -> None:
    evil = '"><script>alert(1)</script>'
    page = await client.get("/oauth/authorize", params=_authorize_params(state=evil))
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text
    _, fields = parse_form(page.text)
    assert fields["state"] == evil


async def test_pkce_missing_or_plain_is_refused(client: httpx.AsyncClient) -> None:
    for params in (
        _authorize_params(code_challenge=None, code_challenge_method=None),
        _authorize_params(code_challenge_method=None),  # defaults to plain: refused
        _authorize_params(code_challenge="a" * 43, code_challenge_method="plain"),
    ):
        response = await client.get("/oauth/authorize", params=params)
        assert response.status_code == 302, response.text
        answer = query_of(response.headers["location"])
        assert response.headers["location"].startswith(REDIRECT)
        assert answer["error"] == "invalid_request"
        assert answer["state"] == "st-123"
        assert "code" not in answer


async def test_pkce_verifier_checked_at_the_token_endpoint(client: httpx.AsyncClient) -> None:
    await sign_up(client, "pk@example.com")
    code, verifier = await authorize_code(client, "pk@example.com")
    missing = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "onecluster-web",
        },
    )
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    other_verifier, _ = pkce_pair()
    wrong = await exchange_code(client, code, other_verifier)
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    # Failed verifications did not burn the code: the rightful holder still gets tokens.
    right = await exchange_code(client, code, verifier)
    assert right.status_code == 200, right.text


async def test_unregistered_redirect_uri_is_never_redirected_to(
    client: httpx.AsyncClient,
) -> None:
    for uri in ("https://evil.example/cb", "http://testserver/cb/../evil", "http://127.0.0.1:9/x"):
        response = await client.get(
            "/oauth/authorize", params=_authorize_params(redirect_uri=uri, code_challenge=None)
        )
        assert response.status_code == 400, uri
        assert "location" not in response.headers
        assert response.headers["content-type"].startswith("text/html")
    unknown = await client.get("/oauth/authorize", params=_authorize_params(client_id="nobody"))
    assert unknown.status_code == 400
    assert "location" not in unknown.headers


async def test_unsupported_response_type_goes_back_to_the_client(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/oauth/authorize", params=_authorize_params(response_type="token"))
    assert response.status_code == 302
    assert query_of(response.headers["location"])["error"] == "unsupported_response_type"


async def test_loopback_redirect_matches_any_port(client: httpx.AsyncClient) -> None:
    await sign_up(client, "native@example.com")
    uri = "http://127.0.0.1:53177/oauth/callback"  # registered with port 8000
    tokens = await login(client, "native@example.com", redirect_uri=uri)
    assert tokens["access_token"]
    other_path = await client.get(
        "/oauth/authorize", params=_authorize_params(redirect_uri="http://127.0.0.1:5317/cb")
    )
    assert other_path.status_code == 400


async def test_callback_page_shows_the_code(client: httpx.AsyncClient) -> None:
    page = await client.get("/oauth/callback", params={"code": "abc<def", "state": "s1"})
    assert page.status_code == 200
    assert "abc&lt;def" in page.text
    failed = await client.get("/oauth/callback", params={"error": "access_denied"})
    assert failed.status_code == 400
    assert "access_denied" in failed.text


async def test_wrong_password_rerenders_and_issues_nothing(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    await sign_up(client, "bob@example.com")
    page = await client.get("/oauth/authorize", params=_authorize_params())
    action, fields = parse_form(page.text)
    for email, password in (("bob@example.com", "wrong password!"), ("nobody@example.com", "x")):
        fields.update(email=email, password=password)
        response = await client.post(action, data=fields)
        assert response.status_code == 200
        assert "location" not in response.headers
        assert "Wrong email or password." in response.text
        _, again = parse_form(response.text)
        assert again["email"] == email  # the form is filled in again, minus the password
        assert again.get("password", "") == ""
    db = gateway.apps["membership"].state.db
    async with db.session_scope() as session:
        failures = (
            (
                await session.execute(
                    sa.select(AuditEvent).where(AuditEvent.action == "user.login_failed")
                )
            )
            .scalars()
            .all()
        )
    assert {f.detail["reason"] for f in failures} == {"bad_password", "unknown_email"}
    assert all(f.outcome == "failed" for f in failures)


async def test_login_form_needs_its_csrf_token_and_cookie(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    await sign_up(client, "csrf@example.com")
    page = await client.get("/oauth/authorize", params=_authorize_params())
    action, fields = parse_form(page.text)
    fields.update(email="csrf@example.com", password="correct horse battery")

    forged = dict(fields, csrf_token=f"{int(time.time())}.{'0' * 64}")
    response = await client.post(action, data=forged)
    assert response.status_code == 400
    assert "location" not in response.headers

    # A cross-site POST carries no cookie (SameSite): refused too.
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as stranger:
        response = await stranger.post(action, data=fields)
    assert response.status_code == 400
    assert "location" not in response.headers

    response = await client.post(action, data=fields)
    assert response.status_code == 302
    assert "code" in query_of(response.headers["location"])


async def test_code_replay_fails_and_revokes_what_it_issued(client: httpx.AsyncClient) -> None:
    await sign_up(client, "replay@example.com")
    code, verifier = await authorize_code(client, "replay@example.com")
    first = await exchange_code(client, code, verifier)
    assert first.status_code == 200
    tokens = first.json()
    assert (await client.get("/oauth/userinfo", headers=bearer(tokens))).status_code == 200

    second = await exchange_code(client, code, verifier)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    # RFC 6749 §4.1.2: tokens issued from a replayed code are revoked.
    assert (await client.get("/oauth/userinfo", headers=bearer(tokens))).status_code == 401
    assert (await refresh(client, tokens["refresh_token"])).status_code == 400


async def test_concurrent_code_exchanges_exactly_one_wins(client: httpx.AsyncClient) -> None:
    await sign_up(client, "race@example.com")
    for _ in range(3):
        code, verifier = await authorize_code(client, "race@example.com")
        results = await asyncio.gather(
            exchange_code(client, code, verifier), exchange_code(client, code, verifier)
        )
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 400], [r.text for r in results]
        loser = next(r for r in results if r.status_code == 400)
        assert loser.json()["error"] == "invalid_grant"


async def test_code_is_bound_to_client_and_redirect_uri(client: httpx.AsyncClient) -> None:
    await sign_up(client, "bind@example.com")
    code, verifier = await authorize_code(client, "bind@example.com")
    other_uri = await exchange_code(
        client, code, verifier, redirect_uri="http://127.0.0.1:8000/oauth/callback"
    )
    assert other_uri.status_code == 400
    assert other_uri.json()["error"] == "invalid_grant"
    unknown_client = await exchange_code(client, code, verifier, client_id="someone-else")
    assert unknown_client.status_code in (400, 401)
    assert unknown_client.json()["error"] == "invalid_client"


async def _firm_claim(tokens: dict[str, Any]) -> str | None:
    return jwt_parts(tokens["access_token"])[1].get("firm_id")


async def test_firm_selection(client: httpx.AsyncClient, gateway: Gateway) -> None:
    await sign_up(client, "firms@example.com")
    first = await login(client, "firms@example.com")
    firm_a = await create_firm(client, first, "Firm A")
    firm_b = await create_firm(client, first, "Firm B")
    await sign_up(client, "stranger@example.com")
    stranger = await login(client, "stranger@example.com")
    firm_c = await create_firm(client, stranger, "Firm C")

    assert await _firm_claim(await login(client, "firms@example.com")) == firm_a["id"]
    chosen = await login(client, "firms@example.com", firm_id=firm_b["id"])
    assert await _firm_claim(chosen) == firm_b["id"]

    # Not a member of firm C: the client hears access_denied and no code is issued.
    page = await client.get("/oauth/authorize", params=_authorize_params(firm_id=firm_c["id"]))
    action, fields = parse_form(page.text)
    fields.update(email="firms@example.com", password="correct horse battery")
    denied = await client.post(action, data=fields)
    assert denied.status_code == 302
    answer = query_of(denied.headers["location"])
    assert answer["error"] == "access_denied"
    assert "code" not in answer

    # Refresh keeps the family's firm while the user belongs to it …
    refreshed = await refresh(client, chosen["refresh_token"])
    assert refreshed.status_code == 200
    assert await _firm_claim(refreshed.json()) == firm_b["id"]
    # … and falls back to the earliest current membership once they do not.
    db = gateway.apps["membership"].state.db
    async with db.session_scope() as session:
        await session.execute(
            sa.update(FirmMember)
            .where(FirmMember.firm_id == firm_b["id"])
            .values(status="deactivated")
        )
    again = await refresh(client, refreshed.json()["refresh_token"])
    assert again.status_code == 200, again.text
    assert await _firm_claim(again.json()) == firm_a["id"]

    # A user token minted before any firm existed gains one on refresh.
    gained = await refresh(client, first["refresh_token"])
    assert gained.status_code == 200
    assert await _firm_claim(gained.json()) == firm_a["id"]


async def test_malformed_parameters_are_400_never_500(client: httpx.AsyncClient) -> None:
    for overrides in (
        {"response_type": 'co"de'},
        {"redirect_uri": 'http://testserver/cb"'},
        {"redirect_uri": "http://testserver/cbé"},
        {"client_id": 'on"e\\web'},
        {"state": "caf\u00e9"},
        {"scope": "openid\nemail"},
    ):
        response = await client.get("/oauth/authorize", params=_authorize_params(**overrides))
        assert response.status_code == 400, (overrides, response.text)
        assert "location" not in response.headers
    for body in (
        'grant_type=client_credentials&x"=1&x"=2',
        "grant_type=pa%22ss",
        "grant_type=refresh_token&refresh_token=%C3%A9&client_id=onecluster-web",
    ):
        response = await client.post(
            "/oauth/token",
            content=body,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"] in ("invalid_request", "unsupported_grant_type")
    as_json = await client.post("/oauth/token", json={"grant_type": "client_credentials"})
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"
