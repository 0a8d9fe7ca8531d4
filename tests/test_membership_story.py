"""The whole membership story through the HTTP API, as a new cluster would live it."""

from __future__ import annotations

import asyncio

import httpx

from tests.oauth_flow import bearer, login, sign_up

BEIJING_AI = {
    "name": "Zhiyuan AI",
    "region": "CN-BJ",
    "city": "Beijing",
    "actor_type": "large_enterprise",
    "industries": ["0301", "0406"],
}
SHANXI_VENDOR = {
    "name": "Taiyuan Data Labelling",
    "region": "CN-SX",
    "city": "Taiyuan",
    "actor_type": "small_micro_enterprise",
    "industries": ["0304"],
}


async def firm_owner(client: httpx.AsyncClient, email: str, firm: dict) -> tuple[dict, dict]:
    """Sign up, register a firm, and sign in again so the token acts for the firm."""
    await sign_up(client, email)
    tokens = await login(client, email)
    created = await client.post("/v1/firms", json=firm, headers=bearer(tokens))
    assert created.status_code == 201, created.text
    tokens = await login(client, email, firm_id=created.json()["id"])
    return created.json(), tokens


async def test_sign_up_firm_cluster_join_approve_members(
    client: httpx.AsyncClient, gateway
) -> None:
    seen: list[str] = []

    async def record(envelope) -> None:
        seen.append(envelope.type)

    gateway.runtime.bus.subscribe("story", record, sources=["membership"])

    core, core_tokens = await firm_owner(client, "owner@zhiyuan.example", BEIJING_AI)
    me = (await client.get("/v1/users/me", headers=bearer(core_tokens))).json()
    assert me["firms"] == [
        {"firm_id": core["id"], "name": "Zhiyuan AI", "role": "owner", "status": "active"}
    ]

    cluster = await client.post(
        "/v1/clusters",
        json={"name": "Jing-Jin-Ji AI", "core_region": "CN-BJ", "focus_industries": ["0406"]},
        headers=bearer(core_tokens),
    )
    assert cluster.status_code == 201, cluster.text
    cluster_id = cluster.json()["id"]
    assert cluster.json()["operator_firm_id"] == core["id"]
    assert cluster.json()["member_count"] == 1

    vendor, vendor_tokens = await firm_owner(client, "boss@taiyuan.example", SHANXI_VENDOR)
    # Not a member yet: the directory entry is visible, the member list is not.
    assert (await client.get(f"/v1/clusters/{cluster_id}", headers=bearer(vendor_tokens))).json()[
        "is_member"
    ] is False
    hidden = await client.get(f"/v1/clusters/{cluster_id}/members", headers=bearer(vendor_tokens))
    assert hidden.status_code == 404

    request = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests",
        json={"message": "We label 50k images a day."},
        headers=bearer(vendor_tokens),
    )
    assert request.status_code == 201, request.text
    assert request.json()["firm"]["id"] == vendor["id"]
    again = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests", json={}, headers=bearer(vendor_tokens)
    )
    assert again.status_code == 409

    pending = await client.get(
        f"/v1/clusters/{cluster_id}/join-requests?status=pending", headers=bearer(core_tokens)
    )
    assert [r["id"] for r in pending.json()["items"]] == [request.json()["id"]]
    # The applicant cannot approve itself.
    self_approve = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests/{request.json()['id']}:approve",
        headers=bearer(vendor_tokens),
    )
    assert self_approve.status_code in (403, 404)
    approved = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests/{request.json()['id']}:approve",
        headers=bearer(core_tokens),
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    twice = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests/{request.json()['id']}:approve",
        headers=bearer(core_tokens),
    )
    assert twice.status_code == 409 and twice.json()["state"] == "approved"

    members = await client.get(f"/v1/clusters/{cluster_id}/members", headers=bearer(vendor_tokens))
    assert members.status_code == 200
    by_id = {m["firm_id"]: m for m in members.json()["items"]}
    assert set(by_id) == {core["id"], vendor["id"]}
    assert by_id[core["id"]]["is_operator"] and not by_id[vendor["id"]]["is_operator"]
    shanxi = await client.get(
        f"/v1/clusters/{cluster_id}/members?region=CN-SX", headers=bearer(core_tokens)
    )
    assert [m["firm_id"] for m in shanxi.json()["items"]] == [vendor["id"]]
    it_services = await client.get(
        f"/v1/clusters/{cluster_id}/members?industry=03", headers=bearer(core_tokens)
    )
    assert {m["firm_id"] for m in it_services.json()["items"]} == {core["id"], vendor["id"]}
    platforms = await client.get(
        f"/v1/clusters/{cluster_id}/members?industry=0406", headers=bearer(core_tokens)
    )
    assert [m["firm_id"] for m in platforms.json()["items"]] == [core["id"]]
    small = await client.get(
        f"/v1/clusters/{cluster_id}/members?actor_type=small_micro_enterprise",
        headers=bearer(core_tokens),
    )
    assert [m["firm_id"] for m in small.json()["items"]] == [vendor["id"]]

    audit = await client.get(f"/v1/clusters/{cluster_id}/audit-events", headers=bearer(core_tokens))
    events = audit.json()["items"]
    assert events[0]["outcome"] == "failed"  # the second approval, refused with 409
    assert events[0]["action"].endswith(":approve")
    actions = [e["action"] for e in events if e["outcome"] == "success"]
    assert actions[0] == "cluster.join_approved"
    assert "cluster.created" in actions and "cluster.join_requested" in actions
    assert all(e["request_id"] for e in audit.json()["items"])

    for _ in range(50):
        if "cluster.member_joined" in seen and seen.count("cluster.member_joined") >= 2:
            break
        await asyncio.sleep(0.1)
    assert seen.count("cluster.member_joined") == 2
    assert "firm.registered" in seen and "cluster.created" in seen


async def test_rejection_needs_a_reason_and_leaving_and_offboarding(
    client: httpx.AsyncClient,
) -> None:
    core, core_tokens = await firm_owner(
        client, "op@agency.example", {**BEIJING_AI, "actor_type": "service_agency"}
    )
    cluster_id = (
        await client.post(
            "/v1/clusters", json={"name": "C", "core_region": "CN-BJ"}, headers=bearer(core_tokens)
        )
    ).json()["id"]
    vendor, vendor_tokens = await firm_owner(
        client, "v@hebei.example", {**SHANXI_VENDOR, "region": "CN-HE"}
    )
    jr = (
        await client.post(
            f"/v1/clusters/{cluster_id}/join-requests", json={}, headers=bearer(vendor_tokens)
        )
    ).json()
    no_reason = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests/{jr['id']}:reject",
        json={},
        headers=bearer(core_tokens),
    )
    assert no_reason.status_code == 422
    rejected = await client.post(
        f"/v1/clusters/{cluster_id}/join-requests/{jr['id']}:reject",
        json={"reason": "Capacity is full this quarter."},
        headers=bearer(core_tokens),
    )
    assert rejected.json()["status"] == "rejected"
    assert rejected.json()["reason"] == "Capacity is full this quarter."

    # The operator invites instead; the firm accepts; then leaves; is invited again and offboarded.
    inv = await client.post(
        f"/v1/clusters/{cluster_id}/invitations",
        json={"firm_id": vendor["id"]},
        headers=bearer(core_tokens),
    )
    assert inv.status_code == 201, inv.text
    seen_by_vendor = await client.get(
        f"/v1/clusters/{cluster_id}/invitations", headers=bearer(vendor_tokens)
    )
    assert [i["id"] for i in seen_by_vendor.json()["items"]] == [inv.json()["id"]]
    accepted = await client.post(
        f"/v1/clusters/{cluster_id}/invitations/{inv.json()['id']}:accept",
        headers=bearer(vendor_tokens),
    )
    assert accepted.json()["status"] == "accepted"
    left = await client.delete(
        f"/v1/clusters/{cluster_id}/members/{vendor['id']}", headers=bearer(vendor_tokens)
    )
    assert left.status_code == 204
    assert (
        await client.get(f"/v1/clusters/{cluster_id}/members", headers=bearer(vendor_tokens))
    ).status_code == 404
    operator_leaves = await client.delete(
        f"/v1/clusters/{cluster_id}/members/{core['id']}", headers=bearer(core_tokens)
    )
    assert operator_leaves.status_code == 409

    inv2 = await client.post(
        f"/v1/clusters/{cluster_id}/invitations",
        json={"firm_id": vendor["id"]},
        headers=bearer(core_tokens),
    )
    await client.post(
        f"/v1/clusters/{cluster_id}/invitations/{inv2.json()['id']}:accept",
        headers=bearer(vendor_tokens),
    )
    offboard = await client.request(
        "DELETE",
        f"/v1/clusters/{cluster_id}/members/{vendor['id']}",
        json={"reason": "Missed every deadline."},
        headers=bearer(core_tokens),
    )
    assert offboard.status_code == 204
    audit = await client.get(
        f"/v1/clusters/{cluster_id}/audit-events?action=cluster.member_offboarded",
        headers=bearer(core_tokens),
    )
    assert audit.json()["items"][0]["detail"] == {"reason": "Missed every deadline."}


async def test_parks_and_occupancy(client: httpx.AsyncClient) -> None:
    core, core_tokens = await firm_owner(client, "op@parks.example", BEIJING_AI)
    cluster_id = (
        await client.post(
            "/v1/clusters", json={"name": "P", "core_region": "CN-BJ"}, headers=bearer(core_tokens)
        )
    ).json()["id"]
    park = await client.post(
        f"/v1/clusters/{cluster_id}/parks",
        json={
            "name": "Zhongguancun Data Park",
            "region": "CN-BJ",
            "city": "Beijing",
            "capacity": 4,
        },
        headers=bearer(core_tokens),
    )
    assert park.status_code == 201, park.text
    assert park.json()["occupancy"] == 0
    located = await client.patch(
        f"/v1/clusters/{cluster_id}/members/{core['id']}",
        json={"park_id": park.json()["id"]},
        headers=bearer(core_tokens),
    )
    assert located.status_code == 200 and located.json()["park_id"] == park.json()["id"]
    view = await client.get(
        f"/v1/clusters/{cluster_id}/parks/{park.json()['id']}", headers=bearer(core_tokens)
    )
    assert view.json()["located_firms"] == 1 and view.json()["occupancy"] == 0.25
    bad_region = await client.post(
        f"/v1/clusters/{cluster_id}/parks",
        json={"name": "X", "region": "CN-XX", "city": "Nowhere", "capacity": 1},
        headers=bearer(core_tokens),
    )
    assert bad_region.status_code == 422


async def test_firm_invitations_roles_and_removal(client: httpx.AsyncClient) -> None:
    firm, owner_tokens = await firm_owner(client, "owner@firm.example", SHANXI_VENDOR)
    invite = await client.post(
        f"/v1/firms/{firm['id']}/invitations",
        json={"email": "Annotator@Firm.example", "role": "annotator"},
        headers=bearer(owner_tokens),
    )
    assert invite.status_code == 201, invite.text
    token = invite.json()["token"]
    listed = await client.get(f"/v1/firms/{firm['id']}/invitations", headers=bearer(owner_tokens))
    assert "token" not in listed.json()["items"][0]

    await sign_up(client, "someone.else@firm.example")
    intruder = await login(client, "someone.else@firm.example")
    wrong_user = await client.post(
        f"/v1/firms/{firm['id']}/invitations/{invite.json()['id']}:accept",
        json={"token": token},
        headers=bearer(intruder),
    )
    assert wrong_user.status_code == 403

    await sign_up(client, "annotator@firm.example")
    annotator = await login(client, "annotator@firm.example")
    bad_token = await client.post(
        f"/v1/firms/{firm['id']}/invitations/{invite.json()['id']}:accept",
        json={"token": "x" * 43},
        headers=bearer(annotator),
    )
    assert bad_token.status_code == 404
    accepted = await client.post(
        f"/v1/firms/{firm['id']}/invitations/{invite.json()['id']}:accept",
        json={"token": token},
        headers=bearer(annotator),
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["role"] == "annotator"
    reused = await client.post(
        f"/v1/firms/{firm['id']}/invitations/{invite.json()['id']}:accept",
        json={"token": token},
        headers=bearer(annotator),
    )
    assert reused.status_code in (409, 410)

    annotator = await login(client, "annotator@firm.example")
    assert (await client.get("/v1/users/me", headers=bearer(annotator))).json()["firms"][0][
        "role"
    ] == "annotator"
    # An annotator cannot promote itself; the owner can make it admin.
    escalate = await client.patch(
        f"/v1/firms/{firm['id']}/members/{accepted.json()['user_id']}",
        json={"role": "owner"},
        headers=bearer(annotator),
    )
    assert escalate.status_code == 403
    promoted = await client.patch(
        f"/v1/firms/{firm['id']}/members/{accepted.json()['user_id']}",
        json={"role": "admin"},
        headers=bearer(owner_tokens),
    )
    assert promoted.json()["role"] == "admin"
    # The last owner cannot step down.
    owner_id = (await client.get("/v1/users/me", headers=bearer(owner_tokens))).json()["id"]
    last_owner = await client.patch(
        f"/v1/firms/{firm['id']}/members/{owner_id}",
        json={"role": "member"},
        headers=bearer(owner_tokens),
    )
    assert last_owner.status_code == 409

    # Removal revokes the removed user's live token at once.
    live = await login(client, "annotator@firm.example")
    assert (await client.get("/v1/users/me", headers=bearer(live))).status_code == 200
    removed = await client.delete(
        f"/v1/firms/{firm['id']}/members/{accepted.json()['user_id']}", headers=bearer(owner_tokens)
    )
    assert removed.status_code == 204
    after = await client.get("/v1/users/me", headers=bearer(live))
    assert after.status_code == 401
    assert "www-authenticate" in after.headers
    refreshed = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": live["refresh_token"],
            "client_id": "onecluster-web",
        },
    )
    assert refreshed.status_code == 400

    denied = await client.get(f"/v1/firms/{firm['id']}/audit-events", headers=bearer(owner_tokens))
    actions = [e["action"] for e in denied.json()["items"]]
    assert "firm.member_removed" in actions
    assert any(e["outcome"] == "denied" for e in denied.json()["items"])


async def test_deactivated_user_token_rejected(client: httpx.AsyncClient) -> None:
    await sign_up(client, "leaving@example.com")
    tokens = await login(client, "leaving@example.com")
    other = await login(client, "leaving@example.com")
    gone = await client.post("/v1/users/me:deactivate", headers=bearer(tokens))
    assert gone.status_code == 200 and gone.json()["is_active"] is False
    assert (await client.get("/v1/users/me", headers=bearer(other))).status_code == 401


async def test_email_is_case_insensitive_and_unique(client: httpx.AsyncClient) -> None:
    await sign_up(client, "Mixed.Case@Example.com")
    dup = await client.post(
        "/v1/users",
        json={
            "email": "mixed.case@example.COM",
            "password": "another password",
            "display_name": "X",
        },
    )
    assert dup.status_code == 409
    assert dup.headers["content-type"].startswith("application/problem+json")
    tokens = await login(client, "MIXED.case@example.com")
    assert (await client.get("/v1/users/me", headers=bearer(tokens))).json()[
        "email"
    ] == "Mixed.Case@example.com"  # the domain is normalised


async def test_reference_data(client: httpx.AsyncClient) -> None:
    industries = (await client.get("/v1/industries")).json()
    assert [c["code"] for c in industries["categories"]] == ["01", "02", "03", "04", "05"]
    regions = (await client.get("/v1/regions?country=CN")).json()
    assert {"CN-BJ", "CN-SX", "CN-NM", "CN-HE"} <= {r["code"] for r in regions}
