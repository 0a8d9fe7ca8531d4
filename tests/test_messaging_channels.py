"""Channels: the general channel per cluster, public, private and direct channels, access."""

from __future__ import annotations

import httpx

from tests.messaging_support import build_world, general_of, post, settle


async def test_general_channel_follows_cluster_membership(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    general = await general_of(client, w)
    assert general["kind"] == "general" and general["joined"] and general["role"] == "admin"
    assert (await general_of(client, w, "sx2"))["role"] == "member"
    # every member firm's users can post; a firm outside the cluster cannot even see it
    assert (await post(client, w, "sx2", general["id"], "hello")).status_code == 201
    outsider = await client.get(f"/v1/channels/{general['id']}", headers=w.h("out"))
    assert outsider.status_code == 404
    listed = await client.get("/v1/channels", headers=w.h("out"))
    assert listed.json()["items"] == []
    members = await client.get(f"/v1/channels/{general['id']}/members", headers=w.h("nm"))
    assert {m["user_id"] for m in members.json()["items"]} == {
        w.ids[p] for p in ("op", "op2", "sx", "sx2", "nm")
    }
    # the firm leaves the cluster: its users lose the channel at once
    left = await client.delete(
        f"/v1/clusters/{w.cluster_id}/members/{w.firms['sx']}", headers=w.h("op")
    )
    assert left.status_code in (200, 204), left.text
    await settle(gateway)
    for person in ("sx", "sx2"):
        gone = await client.get(f"/v1/channels/{general['id']}/messages", headers=w.h(person))
        assert gone.status_code == 404
        assert (await post(client, w, person, general["id"], "still here?")).status_code == 404


async def test_public_private_and_direct_channels(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    pub = await client.post(
        "/v1/channels",
        json={"cluster_id": w.cluster_id, "kind": "public", "name": "quality", "topic": "QA"},
        headers=w.h("sx"),
    )
    assert pub.status_code == 201, pub.text
    pub_id = pub.json()["id"]
    assert pub.json()["role"] == "admin" and pub.json()["joined"]
    # visible and readable to the cluster, but posting needs joining
    seen = await client.get(f"/v1/channels/{pub_id}", headers=w.h("nm"))
    assert seen.status_code == 200 and seen.json()["joined"] is False
    refused = await post(client, w, "nm", pub_id, "hi")
    assert refused.status_code == 403
    assert refused.json()["type"].endswith("not-a-channel-member")
    joined = await client.post(f"/v1/channels/{pub_id}:join", headers=w.h("nm"))
    assert joined.status_code == 200 and joined.json()["joined"] is True
    assert (await post(client, w, "nm", pub_id, "hi")).status_code == 201
    # only its admins rename it
    renamed = await client.patch(f"/v1/channels/{pub_id}", json={"name": "x"}, headers=w.h("nm"))
    assert renamed.status_code == 403
    renamed = await client.patch(
        f"/v1/channels/{pub_id}", json={"topic": "labels"}, headers=w.h("sx")
    )
    assert renamed.status_code == 200 and renamed.json()["topic"] == "labels"
    # an outsider firm's user cannot be invited; nobody sees another cluster's channel
    assert (await client.get(f"/v1/channels/{pub_id}", headers=w.h("out"))).status_code == 404

    priv = await client.post(
        "/v1/channels",
        json={"cluster_id": w.cluster_id, "kind": "private", "name": "deal"},
        headers=w.h("op"),
    )
    priv_id = priv.json()["id"]
    assert (await client.get(f"/v1/channels/{priv_id}", headers=w.h("nm"))).status_code == 404
    assert (await client.post(f"/v1/channels/{priv_id}:join", headers=w.h("nm"))).status_code == 404
    invited = await client.post(
        f"/v1/channels/{priv_id}/members", json={"user_id": w.ids["nm"]}, headers=w.h("op")
    )
    assert invited.status_code == 201, invited.text
    assert invited.json()["firm_id"] == w.firms["nm"]
    bad = await client.post(
        f"/v1/channels/{priv_id}/members", json={"user_id": w.ids["out"]}, headers=w.h("op")
    )
    assert bad.status_code == 404
    assert (await post(client, w, "nm", priv_id, "thanks")).status_code == 201
    listed = await client.get("/v1/channels", headers=w.h("nm"))
    assert priv_id in {c["id"] for c in listed.json()["items"]}
    left = await client.post(f"/v1/channels/{priv_id}:leave", headers=w.h("nm"))
    assert left.status_code == 200 and left.json()["joined"] is False
    assert (await client.get(f"/v1/channels/{priv_id}", headers=w.h("nm"))).status_code == 404
    general = await general_of(client, w)
    cannot = await client.post(f"/v1/channels/{general['id']}:leave", headers=w.h("op"))
    assert cannot.status_code == 409

    # a direct conversation across firms: one per set of people
    dm = await client.post(
        "/v1/conversations",
        json={"cluster_id": w.cluster_id, "user_ids": [w.ids["sx2"], w.ids["nm"]]},
        headers=w.h("op"),
    )
    assert dm.status_code == 201, dm.text
    again = await client.post(
        "/v1/conversations",
        json={"cluster_id": w.cluster_id, "user_ids": [w.ids["nm"], w.ids["sx2"]]},
        headers=w.h("op"),
    )
    assert again.status_code == 200 and again.json()["id"] == dm.json()["id"]
    members = await client.get(f"/v1/channels/{dm.json()['id']}/members", headers=w.h("sx2"))
    assert {m["firm_id"] for m in members.json()["items"]} == {
        w.firms["op"],
        w.firms["sx"],
        w.firms["nm"],
    }
    assert (
        await client.get(f"/v1/channels/{dm.json()['id']}", headers=w.h("op2"))
    ).status_code == 404
    foreign = await client.post(
        "/v1/conversations",
        json={"cluster_id": w.cluster_id, "user_ids": [w.ids["out"]]},
        headers=w.h("op"),
    )
    assert foreign.status_code == 404


async def test_a_user_removed_from_the_firm_loses_the_channels(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    general = await general_of(client, w)
    assert (await post(client, w, "sx2", general["id"], "hello")).status_code == 201
    removed = await client.delete(
        f"/v1/firms/{w.firms['sx']}/members/{w.ids['sx2']}", headers=w.h("sx")
    )
    assert removed.status_code in (200, 204), removed.text
    await settle(gateway)
    fresh = await client.get(f"/v1/channels/{general['id']}", headers=w.h("sx"))
    assert fresh.status_code == 200
    listed = await client.get(f"/v1/channels/{general['id']}/members", headers=w.h("sx"))
    assert w.ids["sx2"] not in {m["user_id"] for m in listed.json()["items"]}


async def test_clients_are_refused(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    created = await client.post(
        f"/v1/firms/{w.firms['op']}/clients",
        json={"name": "bot", "scope": "messaging:read messaging:write"},
        headers=w.h("op"),
    )
    assert created.status_code == 201, created.text
    token = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": created.json()["client_id"],
            "client_secret": created.json()["client_secret"],
            "scope": "messaging:read",
        },
    )
    assert token.status_code == 200, token.text
    listed = await client.get(
        "/v1/channels", headers={"Authorization": f"Bearer {token.json()['access_token']}"}
    )
    assert listed.status_code == 403
