"""Idempotency-Key on real membership routes: replays, secrets withheld, retries allowed."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from tests.oauth_flow import bearer, client_credentials_response, create_firm, login, sign_up


async def test_replayed_creation_runs_once(client: httpx.AsyncClient) -> None:
    await sign_up(client, "idem@example.com")
    tokens = await login(client, "idem@example.com")
    firm = {
        "name": "Once Only Ltd",
        "region": "CN-HE",
        "city": "Shijiazhuang",
        "actor_type": "medium_enterprise",
        "industries": ["0502"],
    }
    headers = {**bearer(tokens), "Idempotency-Key": "firm-1"}
    first = await client.post("/v1/firms", json=firm, headers=headers)
    second = await client.post("/v1/firms", json=firm, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    other = await client.post("/v1/firms", json={**firm, "name": "Other"}, headers=headers)
    assert other.status_code == 422
    mine = await client.get("/v1/firms", headers=bearer(tokens))
    assert [f["name"] for f in mine.json()["items"]] == ["Once Only Ltd"]


async def test_a_refused_request_can_be_retried_with_the_same_key(
    client: httpx.AsyncClient,
) -> None:
    await sign_up(client, "retry@example.com")
    tokens = await login(client, "retry@example.com")
    body = {"name": "Retry cluster", "core_region": "CN-BJ"}
    headers = {"Idempotency-Key": "cluster-1"}
    refused = await client.post("/v1/clusters", json=body, headers={**bearer(tokens), **headers})
    assert refused.status_code == 403  # the token acts for no firm yet
    await create_firm(client, tokens)
    tokens = await login(client, "retry@example.com")
    created = await client.post("/v1/clusters", json=body, headers={**bearer(tokens), **headers})
    assert created.status_code == 201, created.text
    assert "idempotent-replayed" not in created.headers


async def test_a_client_secret_is_never_stored_or_replayed(
    client: httpx.AsyncClient, gateway
) -> None:
    await sign_up(client, "secret@example.com")
    tokens = await login(client, "secret@example.com")
    firm = await create_firm(client, tokens)
    tokens = await login(client, "secret@example.com", firm_id=firm["id"])
    headers = {**bearer(tokens), "Idempotency-Key": "client-1"}
    body = {"name": "ETL", "scope": "membership:read"}
    created = await client.post(f"/v1/firms/{firm['id']}/clients", json=body, headers=headers)
    assert created.status_code == 201, created.text
    secret = created.json()["client_secret"]
    again = await client.post(f"/v1/firms/{firm['id']}/clients", json=body, headers=headers)
    assert again.status_code == 409
    assert again.json()["type"].endswith("/idempotent-secret-withheld")
    assert secret not in again.text
    listed = await client.get(f"/v1/firms/{firm['id']}/clients", headers=bearer(tokens))
    assert len(listed.json()["items"]) == 1
    async with gateway.apps["membership"].state.db.sessionmaker() as session:
        stored = (
            await session.execute(sa.text("SELECT response_body FROM idempotency_keys"))
        ).all()
    assert stored and all(secret.encode() not in (row[0] or b"") for row in stored)

    # OAuth endpoints are left to the protocol: Basic auth plus a key still gets a token.
    token = await client_credentials_response(client, created.json()["client_id"], secret)
    assert token.status_code == 200
    replay = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(created.json()["client_id"], secret),
        headers={"Idempotency-Key": "token-1"},
    )
    assert replay.status_code == 200 and "idempotent-replayed" not in replay.headers
