"""Integrator clients: who may manage them, secrets shown once, both client
authentication methods, secret rotation and disabling."""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa

from api.gateway import Gateway
from services.membership.models import AuditEvent, OAuthClient
from tests.oauth_flow import (
    bearer,
    client_credentials,
    client_credentials_response,
    create_firm,
    invite_member,
    jwt_parts,
    login,
    sign_up,
)


async def _owner_with_firm(client: httpx.AsyncClient, email: str) -> tuple[dict[str, Any], str]:
    await sign_up(client, email)
    firm = await create_firm(client, await login(client, email), f"Firm of {email}")
    return await login(client, email), firm["id"]


async def _create(
    client: httpx.AsyncClient, tokens: dict[str, Any], firm_id: str, **body: Any
) -> httpx.Response:
    payload = {"name": "Annotation pipeline", "scope": "membership:read marketplace:read"}
    payload.update(body)
    return await client.post(f"/v1/firms/{firm_id}/clients", json=payload, headers=bearer(tokens))


async def test_owner_creates_and_the_secret_is_shown_once(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    owner, firm_id = await _owner_with_firm(client, "owner@example.com")
    created = await _create(client, owner, firm_id)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["client_secret"].startswith("ocs_") and len(body["client_secret"]) > 40
    assert body["firm_id"] == firm_id
    assert body["scope"] == "membership:read marketplace:read"
    assert body["grant_types"] == ["client_credentials"]
    assert body["disabled"] is False

    one = await client.get(
        f"/v1/firms/{firm_id}/clients/{body['client_id']}", headers=bearer(owner)
    )
    assert one.status_code == 200
    assert "client_secret" not in one.json()
    assert body["client_secret"] not in one.text
    listed = await client.get(f"/v1/firms/{firm_id}/clients", headers=bearer(owner))
    assert listed.status_code == 200
    assert [c["client_id"] for c in listed.json()["items"]] == [body["client_id"]]
    assert body["client_secret"] not in listed.text

    # Stored as a digest, never as the secret itself.
    db = gateway.apps["membership"].state.db
    async with db.session_scope() as session:
        row = await session.get(OAuthClient, body["client_id"])
        assert row is not None and row.secret_hash
        assert body["client_secret"] not in row.secret_hash
        actions = (
            (
                await session.execute(
                    sa.select(AuditEvent.action).where(AuditEvent.firm_id == firm_id)
                )
            )
            .scalars()
            .all()
        )
    assert "client.created" in actions


async def test_list_is_paginated(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "pages@example.com")
    ids = [
        (await _create(client, owner, firm_id, name=f"c{i}")).json()["client_id"] for i in range(3)
    ]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await client.get(
            f"/v1/firms/{firm_id}/clients", params=params, headers=bearer(owner)
        )
        assert page.status_code == 200
        seen += [c["client_id"] for c in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(ids)
    too_big = await client.get(
        f"/v1/firms/{firm_id}/clients", params={"limit": "1000"}, headers=bearer(owner)
    )
    assert too_big.status_code == 422


async def test_roles_and_tenants(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "boss@example.com")
    await sign_up(client, "staff@example.com")
    await invite_member(
        client, owner, firm_id, await login(client, "staff@example.com"), "staff@example.com"
    )
    member = await login(client, "staff@example.com", firm_id=firm_id)
    outsider, other_firm = await _owner_with_firm(client, "outsider@example.com")
    created = (await _create(client, owner, firm_id)).json()
    theirs = (await _create(client, outsider, other_firm)).json()

    forbidden = await _create(client, member, firm_id)
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"].startswith("application/problem+json")
    assert (
        await client.get(f"/v1/firms/{firm_id}/clients", headers=bearer(member))
    ).status_code == 403

    hidden = await _create(client, outsider, firm_id)
    assert hidden.status_code == 404
    for path in (
        f"/v1/firms/{firm_id}/clients",
        f"/v1/firms/{firm_id}/clients/{created['client_id']}",
    ):
        assert (await client.get(path, headers=bearer(outsider))).status_code == 404
    for verb in ("rotate-secret", "disable"):
        response = await client.post(
            f"/v1/firms/{firm_id}/clients/{created['client_id']}:{verb}", headers=bearer(outsider)
        )
        assert response.status_code == 404
    # A client id of another firm does not exist here, even for this firm's owner.
    foreign = f"/v1/firms/{firm_id}/clients/{theirs['client_id']}"
    assert (await client.get(foreign, headers=bearer(owner))).status_code == 404
    assert (await client.post(f"{foreign}:disable", headers=bearer(owner))).status_code == 404
    check = await client_credentials_response(client, theirs["client_id"], theirs["client_secret"])
    assert check.status_code == 200  # untouched


async def test_needs_membership_write_and_a_user(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "scopes@example.com")
    read_only = await login(client, "scopes@example.com", scope="openid membership:read")
    response = await _create(client, read_only, firm_id)
    assert response.status_code == 403
    assert response.json()["type"].endswith("/insufficient-scope")
    listed = await client.get(f"/v1/firms/{firm_id}/clients", headers=bearer(read_only))
    assert listed.status_code == 200
    # Not even a client of the firm with membership:write manages clients.
    creds = (await _create(client, owner, firm_id, scope="membership:read membership:write")).json()
    machine = await client_credentials(client, creds["client_id"], creds["client_secret"])
    assert (await _create(client, machine, firm_id)).status_code == 403


async def test_payload_validation(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "valid@example.com")
    for body in (
        {"scope": "openid"},  # identity scopes are for users
        {"scope": "membership:read nonsense"},
        {"scope": "   "},
        {"name": ""},
        {"token_endpoint_auth_method": "none"},
        {"client_secret": "chosen-by-me"},  # extra fields are refused
        {"redirect_uris": ["https://x.example/cb"]},
    ):
        response = await _create(client, owner, firm_id, **body)
        assert response.status_code == 422, body
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_basic_and_post_both_work(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "auth@example.com")
    for registered in ("client_secret_basic", "client_secret_post"):
        creds = (
            await _create(client, owner, firm_id, token_endpoint_auth_method=registered)
        ).json()
        for method in ("basic", "post"):
            tokens = await client_credentials(
                client, creds["client_id"], creds["client_secret"], method=method
            )
            header, claims = jwt_parts(tokens["access_token"])
            assert header["typ"] == "at+jwt"
            assert claims["sub"] == creds["client_id"] == claims["client_id"]
            assert claims["firm_id"] == firm_id
            assert claims["scope"] == "membership:read marketplace:read"
            assert claims["exp"] - claims["iat"] == 600
            assert "refresh_token" not in tokens
            firm = await client.get(f"/v1/firms/{firm_id}", headers=bearer(tokens))
            assert firm.status_code == 200, firm.text
        narrowed = await client_credentials(
            client, creds["client_id"], creds["client_secret"], scope="marketplace:read"
        )
        assert narrowed["scope"] == "marketplace:read"
        wider = await client_credentials_response(
            client, creds["client_id"], creds["client_secret"], scope="membership:write"
        )
        assert wider.status_code == 400
        assert wider.json()["error"] == "invalid_scope"
        for method in ("basic", "post"):
            wrong = await client_credentials_response(
                client, creds["client_id"], "ocs_wrong", method=method
            )
            assert wrong.status_code in (400, 401)
            assert wrong.json()["error"] == "invalid_client"


async def test_rotate_secret_invalidates_the_old_one(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "rotor@example.com")
    creds = (await _create(client, owner, firm_id)).json()
    rotated = await client.post(
        f"/v1/firms/{firm_id}/clients/{creds['client_id']}:rotate-secret", headers=bearer(owner)
    )
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["client_secret"]
    assert new_secret != creds["client_secret"]
    assert rotated.json()["secret_rotated_at"]
    for method in ("basic", "post"):
        old = await client_credentials_response(
            client, creds["client_id"], creds["client_secret"], method=method
        )
        assert old.status_code in (400, 401)
        assert old.json()["error"] == "invalid_client"
        assert await client_credentials(client, creds["client_id"], new_secret, method=method)


async def test_disabled_client_gets_nothing_and_its_tokens_die(client: httpx.AsyncClient) -> None:
    owner, firm_id = await _owner_with_firm(client, "off@example.com")
    creds = (await _create(client, owner, firm_id)).json()
    live = await client_credentials(client, creds["client_id"], creds["client_secret"])
    protected = f"/v1/firms/{firm_id}"
    assert (await client.get(protected, headers=bearer(live))).status_code == 200

    disabled = await client.post(
        f"/v1/firms/{firm_id}/clients/{creds['client_id']}:disable", headers=bearer(owner)
    )
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["disabled"] is True

    response = await client.get(protected, headers=bearer(live))
    assert response.status_code == 401
    assert "www-authenticate" in response.headers
    again = await client_credentials_response(client, creds["client_id"], creds["client_secret"])
    assert again.status_code in (400, 401)
    assert again.json()["error"] == "invalid_client"
    shown = await client.get(
        f"/v1/firms/{firm_id}/clients/{creds['client_id']}", headers=bearer(owner)
    )
    assert shown.json()["disabled"] is True
    # Idempotent.
    repeat = await client.post(
        f"/v1/firms/{firm_id}/clients/{creds['client_id']}:disable", headers=bearer(owner)
    )
    assert repeat.status_code == 200
