"""A suspended (deactivated) firm member loses access at once and regains it on reactivation."""

from __future__ import annotations

import httpx

from tests.oauth_flow import bearer, login, sign_up

FIRM = {
    "name": "Hohhot Vision Labelling",
    "region": "CN-NM",
    "city": "Hohhot",
    "actor_type": "small_micro_enterprise",
    "industries": ["0304"],
}


async def test_suspended_admin_is_refused_until_reactivated(client: httpx.AsyncClient) -> None:
    await sign_up(client, "owner@hohhot.example")
    owner = await login(client, "owner@hohhot.example")
    firm = (await client.post("/v1/firms", json=FIRM, headers=bearer(owner))).json()
    invite = await client.post(
        f"/v1/firms/{firm['id']}/invitations",
        json={"email": "admin@hohhot.example", "role": "admin"},
        headers=bearer(owner),
    )
    await sign_up(client, "admin@hohhot.example")
    admin = await login(client, "admin@hohhot.example")
    joined = await client.post(
        f"/v1/firms/{firm['id']}/invitations/{invite.json()['id']}:accept",
        json={"token": invite.json()["token"]},
        headers=bearer(admin),
    )
    admin_id = joined.json()["user_id"]
    admin = await login(client, "admin@hohhot.example", firm_id=firm["id"])
    assert (
        await client.get(f"/v1/firms/{firm['id']}/invitations", headers=bearer(admin))
    ).status_code == 200

    suspended = await client.post(
        f"/v1/firms/{firm['id']}/members/{admin_id}:deactivate", headers=bearer(owner)
    )
    assert suspended.status_code == 200 and suspended.json()["status"] == "deactivated"
    # The live token acting for the firm is deny-listed at once ...
    assert (await client.get("/v1/users/me", headers=bearer(admin))).status_code == 401
    # ... and a fresh token (no longer acting for the firm) cannot use the firm.
    fresh = await login(client, "admin@hohhot.example")
    refused = await client.get(f"/v1/firms/{firm['id']}/invitations", headers=bearer(fresh))
    assert refused.status_code == 403
    patch = await client.patch(f"/v1/firms/{firm['id']}", json={"name": "X"}, headers=bearer(fresh))
    assert patch.status_code == 403
    assert (await client.get(f"/v1/firms/{firm['id']}", headers=bearer(owner))).json()[
        "name"
    ] == FIRM["name"]

    back = await client.post(
        f"/v1/firms/{firm['id']}/members/{admin_id}:reactivate", headers=bearer(owner)
    )
    assert back.json()["status"] == "active"
    again = await login(client, "admin@hohhot.example", firm_id=firm["id"])
    assert (
        await client.get(f"/v1/firms/{firm['id']}/invitations", headers=bearer(again))
    ).status_code == 200
